"""fp8 codes with one fp32 scale per layer and stream (`Fp8Codec`), as vLLM's fp8 KV cache."""

from __future__ import annotations

import torch

from .codec_base import Codec, _check_block
from .formats import StreamFormat

__all__ = ["Fp8Codec"]


class Fp8Codec(Codec):
    """fp8 codes (e4m3 or e5m2) with one fp32 scale per layer (amax / fp8 max, from calibration or the
    first block). Values beyond the calibrated range saturate, as in vLLM's fp8 KV cache."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self.dtype = torch.float8_e4m3fn if fmt.levels == "float8_e4m3" else torch.float8_e5m2
        self._tensor_scale: torch.Tensor | None = None  # fp32 [1]

    @property
    def calibrated(self) -> bool:
        return self._tensor_scale is not None

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        _check_block(x)
        amax = float(x.abs().amax()) or 1.0
        self._tensor_scale = torch.tensor([amax / torch.finfo(self.dtype).max], dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        if not self.calibrated:
            self.calibrate(x)
        fmax = torch.finfo(self.dtype).max
        return {"codes": (x.float() / self._tensor_scale).clamp(-fmax, fmax).to(self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        return parts["codes"].float() * self._tensor_scale

    def shared(self) -> dict[str, torch.Tensor]:
        return {"tensor_scale": self._tensor_scale} if self._tensor_scale is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._tensor_scale = state["tensor_scale"]
