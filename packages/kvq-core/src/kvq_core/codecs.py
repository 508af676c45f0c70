"""Codecs: turn a block of one stream (keys or values) into the stored tensors of its format, and back.

`make_codec` builds the codec a stream format names (`StreamFormat.codec`, which follows from its
levels and option groups) from `CODECS`. Each codec lives in its own module over the interface in
`codec_base`:

- "affine" `codecs_affine.AffineCodec`: uniform grids (int baselines, KIVI, SKVQ, block floating point).
- "nuq"    `codecs_nuq.NuqCodec`: non-uniform codebooks with dense-and-sparse outliers (KVQuant).
- "fp8"    `codecs_fp8.Fp8Codec`: fp8 codes with one fp32 scale per layer (vLLM).
- "pq"     `codecs_pq.PQCodec`: product quantization (MILLION).
- "rotate" `codecs_rotate.RotateCodec`: Hadamard rotation across heads (RotateKV).
- "gear"   `codecs_lowrank.GearCodec`: codes + low-rank error factors + outliers (GEAR).
- "cskv"   `codecs_lowrank.CskvCodec`: fp16 latents in a calibrated basis (CSKV).
- "vidkv"  `codecs_vidkv.VidkvCodec`: 1-bit / ternary absmean codes, mixed channels, FFT (VidKV).

Token tiers (ZipCache, MiKV, eviction) and age steps (staircase) are stream layouts, not codecs:
`cache_tiers`, `cache_staircase`.
"""

from __future__ import annotations

from .codec_base import CAT_DIM, Codec, sparse_outliers
from .codecs_affine import AffineCodec
from .codecs_fp8 import Fp8Codec
from .codecs_lowrank import CskvCodec, GearCodec
from .codecs_nuq import NuqCodec, weighted_kmeans_1d
from .codecs_pq import PQCodec
from .codecs_rotate import RotateCodec
from .codecs_vidkv import VidkvCodec
from .formats import StreamFormat

__all__ = [
    "CAT_DIM",
    "CODECS",
    "AffineCodec",
    "Codec",
    "CskvCodec",
    "Fp8Codec",
    "GearCodec",
    "NuqCodec",
    "PQCodec",
    "RotateCodec",
    "VidkvCodec",
    "make_codec",
    "sparse_outliers",
    "weighted_kmeans_1d",
]

#: the codec class of each codec name a `StreamFormat` can carry (`StreamFormat.codec`).
CODECS: dict[str, type[Codec]] = {
    "affine": AffineCodec,
    "nuq": NuqCodec,
    "fp8": Fp8Codec,
    "pq": PQCodec,
    "rotate": RotateCodec,
    "gear": GearCodec,
    "cskv": CskvCodec,
    "vidkv": VidkvCodec,
}


def make_codec(fmt: StreamFormat, head_dim: int) -> Codec:
    """The codec for a quantized stream format: ``CODECS[fmt.codec]``."""
    if fmt.codec not in CODECS:
        raise ValueError(f"no codec named {fmt.codec!r}; valid: {', '.join(CODECS)}")
    return CODECS[fmt.codec](fmt, head_dim)
