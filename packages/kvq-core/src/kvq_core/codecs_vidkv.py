"""VidKV (arXiv:2503.16257): 1.x-bit keys (2-bit anomalous channels + 1-bit rFFT of the rest), 1.58-bit values.

Both streams are quantized per channel over groups of G tokens (VidKV finds per-channel values better
than per-token for VideoLLMs).

Keys: each head's channels are permuted so the k = floor(f * D) widest-range channels (calibration
max - min: VidKV's "anomalous" channels) come first (int16 ``[H, D]``, per layer). Those get 2-bit
asymmetric codes (fp16 scale + zero per group). The other D' = D - k channels of each token are
replaced by their D' coefficients in the orthonormal real Fourier basis (Re of bins 0..D'/2, Im of
bins 1..(D'-1)/2, conjugate pairs scaled by sqrt(2): exactly D' reals, norm kept) and binarised: sign, times one absmean scale (mean |c|) per
coefficient per group. VidKV's released code keeps the full complex FFT (2 D' reals); the rFFT here
stores the same information in D' values, so "1-bit" costs 1 bit per channel.

Values: ternary {-1, 0, +1} x absmean scale per channel per group, with threshold 0.5 x mean |x|
(VidKV's 1.58-bit, BitNet-style), stored 5 trits per byte.

Codes of a token row: ``[packed 2-bit anomalous (k) | packed 1-bit coefficients (D')]``;
scale ``[B, H, t / G, D]`` (anomalous channels, then coefficients); zero ``[B, H, t / G, k]``.
VidKV's salient-token preservation for values is not implemented.
"""

from __future__ import annotations

import torch

from . import quant
from .codec_base import Codec, _check_block
from .formats import StreamFormat
from .packing import pack, packed_row_bytes, unpack

__all__ = ["VidkvCodec", "rfft_real", "irfft_real"]


def _pair_weight(n: int) -> torch.Tensor:
    # bins 1..(n-1)//2 stand for a conjugate pair: sqrt(2) makes the real basis orthonormal
    w = torch.ones(n // 2 + 1, dtype=torch.float64)
    w[1 : (n - 1) // 2 + 1] = 2**0.5
    return w


def rfft_real(x: torch.Tensor) -> torch.Tensor:
    """x ``[..., n]`` in the orthonormal real Fourier basis: ``[Re 0..n//2 | Im 1..(n-1)//2]`` (n reals, norm kept)."""
    n = x.shape[-1]
    c = torch.fft.rfft(x.double(), dim=-1, norm="ortho") * _pair_weight(n)
    return torch.cat([c.real, c.imag[..., 1 : (n - 1) // 2 + 1]], -1).to(x.dtype)


def irfft_real(y: torch.Tensor) -> torch.Tensor:
    """Inverse of `rfft_real`."""
    n = y.shape[-1]
    re = y[..., : n // 2 + 1].double()
    im = torch.zeros_like(re)
    im[..., 1 : (n - 1) // 2 + 1] = y[..., n // 2 + 1 :].double()
    c = torch.complex(re, im) / _pair_weight(n)
    return torch.fft.irfft(c, n=n, dim=-1, norm="ortho").to(y.dtype)


def _groups(y: torch.Tensor, g: int) -> torch.Tensor:
    # [B, H, t, C] -> [B, H, t / G, G, C]
    b, h, t, c = y.shape
    return y.reshape(b, h, t // g, g, c)


def absmean_quantize(y: torch.Tensor, bits: float, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel groups of g tokens: (codes uint8 ``[B, H, t, C]``, fp16 scale ``[B, H, t / g, C]``).

    1 bit: code = x >= 0, x_hat = (2 code - 1) s. Ternary: code = 1 + sign(x) where |x| > s / 2, else 1,
    x_hat = (code - 1) s. s = mean |x| over the group, rounded to fp16, saturating at fp16's 65504: an
    rFFT coefficient can exceed its inputs by sqrt(D') (the DC term of D' channels all equal to 65504 is
    65504 sqrt(D')), and such a group reconstructs at that bound rather than as inf.
    """
    yg = _groups(y, g)
    scale = yg.abs().mean(-2).clamp_max(quant.FP16_MAX).to(torch.float16)  # [B, H, t/G, C]
    s = scale.float()[..., None, :]
    if bits == 1:
        codes = (yg >= 0).to(torch.uint8)
    else:
        codes = (1 + (yg > s / 2).to(torch.int8) - (yg < -s / 2).to(torch.int8)).to(torch.uint8)
    return codes.reshape(y.shape), scale


def absmean_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: float, g: int) -> torch.Tensor:
    c = _groups(codes.float(), g)
    level = 2 * c - 1 if bits == 1 else c - 1
    return (level * scale.float()[..., None, :]).reshape(codes.shape)


class VidkvCodec(Codec):
    """VidKV per-channel codes: mixed 2-bit / 1-bit-FFT keys, or ternary absmean values (module docstring)."""

    def __init__(self, fmt: StreamFormat, head_dim: int):
        super().__init__(fmt, head_dim)
        self.k = fmt.mixed_channels(head_dim)
        self._perm: torch.Tensor | None = None  # int16 [H, D]: anomalous channels first

    @property
    def calibrated(self) -> bool:
        return not self.fmt.reorder_channels or self._perm is not None

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Anomalous channels per head: the k widest calibration ranges (max - min over batch and tokens).

        Only a stream that reorders (keys) has a channel order; values keep theirs and store none.
        """
        _check_block(x)
        if not self.fmt.reorder_channels:
            return
        rng = x.float().amax(dim=(0, 2)) - x.float().amin(dim=(0, 2))  # [H, D]
        top = torch.topk(rng, self.k, dim=-1).indices.sort(-1).values
        rest = torch.ones_like(rng, dtype=torch.bool).scatter_(-1, top, False)
        others = torch.stack([torch.nonzero(r).flatten() for r in rest])  # [H, D - k], ascending
        self._perm = torch.cat([top, others], -1).to(torch.int16)

    def _check(self, t: int) -> None:
        if t % self.fmt.group_size:
            raise ValueError(f"VidKV quantizes whole groups of {self.fmt.group_size} tokens, got a block of {t}")

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_block(x)
        self._check(x.shape[2])
        f, g = self.fmt, self.fmt.group_size
        y = x.float()
        if f.reorder_channels:
            if self._perm is None:
                self.calibrate(x)  # uncalibrated: pick the anomalous channels on the first block (the prefill)
            y = torch.gather(y, -1, self._perm.long()[None, :, None, :].expand_as(y))
        parts: dict[str, torch.Tensor] = {}
        codes, scales = [], []
        if self.k:
            a = y[..., : self.k]
            scale, zero = quant.choose_qparams(a, f.absmean.mixed_bits, "channel", g, False, f.scale_dtype)
            codes.append(pack(quant.quantize(a, scale, zero, f.absmean.mixed_bits, "channel", g), f.absmean.mixed_bits))
            scales.append(scale)
            parts["zero"] = zero
        rest = rfft_real(y[..., self.k :]) if f.absmean.fft else y[..., self.k :]
        c, s = absmean_quantize(rest, f.bits, g)
        codes.append(pack(c, f.bits))
        scales.append(s.to(quant.storage_dtype(f.scale_dtype)))
        parts["codes"] = torch.cat(codes, -1)
        parts["scale"] = torch.cat(scales, -1)
        return parts

    def decode(self, parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
        f, g, d = self.fmt, self.fmt.group_size, self._d
        split = packed_row_bytes(f.absmean.mixed_bits, self.k) if self.k else 0
        segs = []
        if self.k:
            a = unpack(parts["codes"][..., :split], f.absmean.mixed_bits, self.k)
            segs.append(
                quant.dequantize(a, parts["scale"][..., : self.k], parts["zero"], f.absmean.mixed_bits, "channel", g)
            )
        c = unpack(parts["codes"][..., split:], f.bits, d - self.k)
        rest = absmean_dequantize(c, parts["scale"][..., self.k :], f.bits, g)
        segs.append(irfft_real(rest) if f.absmean.fft else rest)
        y = torch.cat(segs, -1)
        if self._perm is not None:
            inv = torch.argsort(self._perm.long(), dim=-1)[None, :, None, :].expand_as(y)
            y = torch.gather(y, -1, inv)
        return y

    def shared(self) -> dict[str, torch.Tensor]:
        return {"reorder": self._perm} if self._perm is not None else {}

    def load_state_dict(self, state: dict) -> None:
        perm = state.get("reorder")
        if perm is not None and not self.fmt.reorder_channels:
            # a stream without reorder keeps its channel order: only the identity is consistent with it
            if not torch.equal(perm.long(), torch.arange(perm.shape[-1]).expand_as(perm)):
                raise ValueError("calibration state has a channel order for a VidKV stream that does not reorder")
            perm = None
        self._perm = perm
