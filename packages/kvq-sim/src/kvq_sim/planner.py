"""Exact max context / max batch by search over the monotone memory model (no closed forms)."""

from __future__ import annotations

from collections.abc import Callable

from .deployment import Deployment
from .errors import SimInputError
from .hardware import GIB
from .memory import memory

# Upper ends of the searches: 2^34 tokens (17 billion) and 2^24 sequences are beyond any GPU node;
# a model that still fits there (a sliding window caps its cache) is reported as unbounded (None).
MAX_CONTEXT_TOKENS = 1 << 34
MAX_BATCH = 1 << 24


def fits(dep: Deployment, batch: int, context: int) -> bool:
    return memory(dep, batch, context).fits


def check_weights_fit(dep: Deployment) -> None:
    """Raise when the weights, reserve and smallest activations alone exceed a GPU's usable memory."""
    mb = memory(dep, 1, 1)
    if not mb.fits:
        raise SimInputError(
            f"{dep.model.name} at {dep.weight_bits}-bit weights does not fit {dep.hardware.name}: weights alone need "
            f"{mb.weights_bytes / GIB:.2f} GiB per GPU (plus {mb.reserve_bytes / GIB:.2f} GiB reserve), "
            f"the GPU has {mb.usable_bytes / GIB:.2f} GiB usable"
        )


def _largest(ok: Callable[[int], bool], limit: int) -> int | None:
    """Largest n in [0, limit] with ok(n), for ok monotone (true then false) and ok(0) true; None if ok(limit)."""
    hi = 1
    while hi <= limit and ok(hi):  # exponential probe keeps the search at ~2 log2(answer) evaluations
        hi *= 2
    if hi > limit:
        if ok(limit):
            return None
        hi = limit
    lo = hi // 2  # ok(lo) holds (lo == 0 counts as the trivially fitting empty case)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def max_context(dep: Deployment, batch: int = 1) -> int | None:
    """Largest context (tokens per sequence) that fits `batch` sequences; None = unbounded (sliding window)."""
    return _largest(lambda t: fits(dep, batch, t), MAX_CONTEXT_TOKENS)


def max_batch(dep: Deployment, context: int) -> int | None:
    """Largest number of `context`-token sequences that fit at once; None = more than MAX_BATCH."""
    return _largest(lambda b: fits(dep, b, context), MAX_BATCH)
