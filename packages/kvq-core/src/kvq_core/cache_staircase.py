"""Staircase (age-based) precision: a stream whose tokens lose bits as they age (SAQ, arXiv:2410.18441).

Chronological segments: fp16 sinks | oldest step (`bits`) | ... | newest step | fp16 sliding window.
A token leaving the window enters the newest step (`steps.steps[0]`, e.g. 8 bits); when a step holds
more than its n tokens, its oldest tokens are re-encoded one step down from their reconstruction
(the higher-precision codes are all that is kept), down to `bits`, where they stay. Every step stores
per-token codes per head with fp16 scale and zero, so tokens move between steps independently.
Re-encoding on a step-down is the method itself, not history re-quantized by a flush policy: each
token is encoded once per step, at most len(steps.steps) + 1 times in its life.
"""

from __future__ import annotations

import torch

from .cache_tiers import TokenTier
from .formats import StreamFormat
from .quant import check_kv_range

__all__ = ["StaircaseStream"]

_FP = torch.float16


def _shape_of(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class StaircaseStream:
    """One stream (K or V) with age steps; the same reading API as `cache.QuantizedStream`."""

    codec = None  # nothing to calibrate: every step quantizes per token on the fly

    def __init__(self, fmt: StreamFormat, head_dim: int, sink_tokens: int = 0):
        if fmt.steps is None:
            raise ValueError("a staircase stream needs StreamFormat.steps (AgeSteps)")
        self.fmt = fmt
        self.head_dim = head_dim
        self.sink_tokens = sink_tokens
        self.caps = [n for n, _ in fmt.steps.steps] + [None]  # the last step is unbounded
        self.steps = [TokenTier(fmt, b, head_dim) for _, b in fmt.steps.steps] + [TokenTier(fmt, fmt.bits, head_dim)]
        self.sinks: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.tokens = 0

    def append(self, x: torch.Tensor) -> None:
        """Append a block ``x: [B, H, t, D]`` (finite, within fp16's +-65504: tokens wait in the fp16 window)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"expected a tensor [batch, kv_heads, tokens, {self.head_dim}], got {_shape_of(x)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"K/V must be floating point, got {x.dtype}")
        check_kv_range(x)
        ref = self.residual if self.residual is not None else self.sinks
        if ref is not None and ref.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"batch/heads mismatch: cache holds {tuple(ref.shape[:2])}, block has {tuple(x.shape[:2])}"
            )
        xs = x.to(_FP)
        have = 0 if self.sinks is None else self.sinks.shape[2]
        take = min(self.sink_tokens - have, xs.shape[2])
        if take > 0:
            self.sinks = xs[:, :, :take] if self.sinks is None else torch.cat([self.sinks, xs[:, :, :take]], 2)
            xs = xs[:, :, take:]
        self.tokens += x.shape[2]
        self.residual = xs if self.residual is None else torch.cat([self.residual, xs], 2)
        out = max(0, self.residual.shape[2] - self.fmt.residual_tokens)
        if out == 0:
            return
        moving = self.residual[:, :, :out].float()
        self.residual = self.residual[:, :, out:].contiguous()
        for step, cap in zip(self.steps, self.caps):
            step.append(moving)
            over = 0 if cap is None else len(step) - cap
            if over <= 0:
                break
            moving = step.take_oldest(over)  # these step down to the next (older, fewer-bit) step

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        segs = [self.sinks.float()] if self.sinks is not None else []
        segs += [s.deq for s in reversed(self.steps) if len(s)]
        if self.residual is not None and self.residual.shape[2]:
            segs.append(self.residual.float())
        if not segs:
            raise ValueError("the stream is empty")
        return torch.cat(segs, 2).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"step{i}.{n}": t for i, s in enumerate(self.steps) for n, t in s.parts.items()}
        if self.sinks is not None:
            out["sinks"] = self.sinks
        if self.residual is not None:
            out["residual"] = self.residual
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())
