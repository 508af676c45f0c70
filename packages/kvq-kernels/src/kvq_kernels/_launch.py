"""Launcher helpers shared by the kernels: input checks with clear errors, split-KV sizing, interpreter mode."""

from __future__ import annotations

import math
import os

import torch

from kvq_core.splits import split_count


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(name: str, t: torch.Tensor, dtype: torch.dtype | tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    """Raise ValueError unless `t` is a contiguous tensor of `dtype` and exactly `shape`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()); got strides {t.stride()}")


def check_lens(lens: torch.Tensor, batch: int, capacity: int, device: torch.device, values: bool = True) -> int | None:
    """lens: int32 [batch], each in [0, capacity]. With `values`, reads min and max on the host (one device
    sync: it waits for all queued GPU work and cannot be captured in a CUDA graph) and returns the max."""
    check("lens", lens, torch.int32, (batch,))
    check_device("lens", lens, device)
    if not values or batch == 0:
        return None
    lo, hi = torch.stack(torch.aminmax(lens)).tolist()
    if lo < 0 or hi > capacity:
        raise ValueError(f"lens must lie in [0, {capacity}] (the cache capacity); got min {lo}, max {hi}")
    return hi


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors of a launch on one device)")


def check_launchable(device: torch.device) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"tensors on {device} need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors")


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi] (bools and floats rejected), else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got {value}")
    return value


def check_pow2(name: str, value, lo: int, hi: int) -> int:
    """`value` as a power of two in [lo, hi] (Triton's tl.arange and num_warps need powers of two)."""
    check_int(name, value, lo, hi)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value}")
    return value


def check_sm_scale(sm_scale) -> None:
    """None (1/sqrt(head_dim)) or a finite positive number: a NaN scale would turn every output to NaN."""
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be a finite number or None, got {sm_scale!r}")
    if sm_scale <= 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")


#: Tile rows a launcher accepts: tl.dot needs >= 16; a [256, 128] fp32 tile already fills half an H100 SM's
#: 256 KiB register file, so larger tiles spill.
BLOCK_N_RANGE = (16, 256)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep CPU tests fast


def num_splits(
    programs_per_split: int, max_tokens: int, block_n: int, device: torch.device, waves: int = 4, fill: bool = True
) -> int:
    """Splits of the context: at least about `waves` waves of programs over the SMs (whole waves with `fill`);
    the rule is kvq_core.splits.split_count, which the simulator's cost model runs too."""
    return split_count(programs_per_split, max(1, math.ceil(max_tokens / block_n)), num_sms(device), waves, fill)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
