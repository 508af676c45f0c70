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
    programs_per_split: int,
    max_tokens: int,
    block_n: int,
    device: torch.device,
    waves: int = 4,
    fill: bool = True,
    resident: int = 1,
) -> int:
    """Splits of the context: at least about `waves` waves of programs over the SMs (whole waves of `resident`
    programs per SM with `fill`); the rule is kvq_core.splits.split_count, which the simulator's cost model runs
    too."""
    tiles = max(1, math.ceil(max_tokens / block_n))
    return split_count(programs_per_split, tiles, num_sms(device), waves, fill, resident)


#: Registers are allocated per warp in units of 256 (CUDA occupancy calculator, compute capability 7.0-9.0);
#: every thread block also holds 1 KiB of shared memory for the system (sm_80 and later).
REG_ALLOC_UNIT = 256
BLOCK_RESERVED_SHARED_BYTES = 1024
MAX_BLOCKS_PER_SM = 32


def occupancy(n_regs: int, shared_bytes: int, num_warps: int, regs_per_sm: int, threads_per_sm: int,
              shared_per_sm: int) -> int:  # fmt: skip
    """Programs (thread blocks) of a kernel resident on one SM at once: the least of what its registers, shared
    memory and threads allow (at least 1). E.g. 255 registers a thread, 2 warps, 33,792 B of shared memory on an
    H100 (65,536 registers, 2,048 threads, 233,472 B): registers 65,536 // (2 * 8,192) = 4, shared memory
    233,472 // 34,816 = 6, threads 16: 4."""
    warp_regs = math.ceil(n_regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = regs_per_sm // max(1, warp_regs * num_warps)
    by_shared = shared_per_sm // (shared_bytes + BLOCK_RESERVED_SHARED_BYTES)
    by_threads = threads_per_sm // (32 * num_warps)
    return max(1, min(by_regs, by_shared, by_threads, MAX_BLOCKS_PER_SM))


_RESIDENT: dict = {}


def resident_programs(kernel, args: tuple, kwargs: dict, device: torch.device) -> int:
    """Programs of `kernel` compiled for these arguments that one SM holds at once (`occupancy` of its registers,
    shared memory and warps); 1 under the interpreter. Compiles without launching (Triton's `warmup`, as the
    Triton fused-softmax tutorial sizes its grid) on the first call per kernel, constexprs and device; later calls
    read a cache. Integer arguments are keyed only by their constexpr neighbours: the variants Triton specializes
    on an integer's value (1, multiples of 16) are taken to hold the same resources."""
    if interpreting() or device.type != "cuda":
        return 1
    key = (kernel, device.index, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()  # loads the binary: n_regs is known from then on
        props = torch.cuda.get_device_properties(device)
        _RESIDENT[key] = occupancy(
            compiled.n_regs,
            compiled.metadata.shared,
            compiled.metadata.num_warps,
            props.regs_per_multiprocessor,
            props.max_threads_per_multi_processor,
            props.shared_memory_per_multiprocessor,
        )
    return _RESIDENT[key]


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
