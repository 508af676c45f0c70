"""RotateKV (arXiv:2501.16383): outlier-aware channel reorder + fast Walsh-Hadamard rotation, then low-bit codes.

Per token, the H*D channels of all KV heads are permuted (stored int16 ``[H*D]``, counted as the
format's reorder indices) and rotated by a normalised Hadamard transform in blocks of n channels,
n = the largest power of two dividing H*D (the whole token when H*D is a power of two: Llama-3-8B's
8 x 128 = 1024), i.e. "grouped-head" rotation across heads. The reorder is outlier-aware: channels
are ranked by calibration max |x| and dealt round-robin to the rotation blocks, so every block gets
an equal share of outlier channels before the Hadamard spreads them. The rotated vector is cut back
into H rows of D and quantized per token per row (asymmetric, fp16 scale and zero).

Keys are stored pre-RoPE (the format sets `pre_rope_keys`; RoPE does not commute with the rotation),
and the first token (the attention sink, whose massive activations RotateKV detects) stays fp16 via
the format's sinks. The Hadamard matrix is orthogonal and symmetric, so decode applies it again; an
attention kernel would instead rotate the query once (q.R^T)(R.k) = q.k.
"""

from __future__ import annotations

import torch

from . import quant
from .codec_base import Codec, _check_block, _flat, _unflat
from .formats import StreamFormat
from .packing import pack, unpack

__all__ = ["RotateCodec", "fwht", "rotation_block"]


def rotation_block(channels: int) -> int:
    """Hadamard block size: the largest power of two dividing `channels` (1024 for 8 x 128, 64 for 3 x 64)."""
    return channels & -channels


def fwht(x: torch.Tensor, n: int) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over consecutive blocks of n channels of the last dim.

    Self-inverse: ``fwht(fwht(x, n), n) == x`` (up to rounding). n must be a power of two dividing the last dim.
    """
    shape = x.shape
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2).reshape(-1, n)
        h *= 2
    return (y * n**-0.5).reshape(shape)


class RotateCodec(Codec):
    """Reorder (int16 ``[H*D]``) + block Hadamard across heads + per-token affine codes per head row."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        if fmt.axis != "token" or fmt.groups_span_heads:
            raise ValueError("RotateKV quantizes per token within each head row after rotation (axis='token')")
        self._perm: torch.Tensor | None = None  # int16 [H*D]

    @property
    def calibrated(self) -> bool:
        return self._perm is not None

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Outlier-aware order: channels by descending calibration max |x|, dealt round-robin to the blocks."""
        _check_block(x)
        c = x.shape[1] * x.shape[3]
        n = rotation_block(c)
        amax = _flat(x.float()).reshape(-1, c).abs().amax(0)  # [H*D]
        ranked = torch.argsort(amax, descending=True, stable=True)
        self._perm = ranked.reshape(n, c // n).T.reshape(-1).to(torch.int16)  # block j: ranks j, j + c/n, ...

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[1]
        y = _flat(x.float())[..., self._perm.long()]  # [B, 1, t, H*D]
        return _unflat(fwht(y, rotation_block(y.shape[-1])), h)

    def _unrotate(self, y: torch.Tensor) -> torch.Tensor:
        h = y.shape[1]
        z = fwht(_flat(y), rotation_block(h * y.shape[-1]))
        return _unflat(z[..., torch.argsort(self._perm.long())], h)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        if not self.calibrated:
            self.calibrate(x)  # uncalibrated: fit the order on the first block (the prefill)
        f = self.fmt
        y = self._rotate(x)
        scale, zero = quant.choose_qparams(y, f.bits, "token", f.group_size, f.symmetric, f.scale_dtype)
        codes = quant.quantize(y, scale, zero, f.bits, "token", f.group_size)
        parts = {"codes": pack(codes, f.bits), "scale": scale}
        if zero is not None:
            parts["zero"] = zero
        return parts

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        f = self.fmt
        codes = unpack(parts["codes"], f.bits, self._d)
        y = quant.dequantize(codes, parts["scale"], parts.get("zero"), f.bits, "token", f.group_size)
        return self._unrotate(y)

    def shared(self) -> dict[str, torch.Tensor]:
        return {"reorder": self._perm} if self._perm is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._perm = state["reorder"]
