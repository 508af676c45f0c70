"""Launch grids of the decode-attention kernels the simulator costs: how many programs (thread blocks) a
launch runs and into how many splits of the context (torch-free).

- "kvq": kvq-kernels' split-KV kernels, whose launchers run the same rule (kvq_core.splits.split_count):
  B * H_kv programs per split, splits for about `waves` waves of the SMs, whole waves preferred, plus
  tail programs for the fp16 residual window and sinks. "kvq-nofill": the same without the whole-wave
  preference (the CUDA-core KIVI kernel).
- "flash": FlashAttention-2 as torch SDPA runs it (flash-attention csrc/flash_attn/flash_api.cpp,
  `num_splits_heuristic` called with 2 * multiProcessorCount slots, kBlockN 128 for head_dim 65-128,
  256 up to 64, 64 above; decode with more query than KV heads packs the query heads of a KV head into
  the M dimension, so B * H_kv rows of ceil(group / 64) M blocks). It splits only when rows < 0.8 * slots
  and otherwise runs its non-split kernel, one program per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvq_core.splits import split_count

GRIDS = ("", "kvq", "kvq-nofill", "flash")  # "": no grid model (fixed-cost and streaming terms only)


@dataclass(frozen=True)
class Launch:
    programs: int  # programs of the main pass over the context (wave quantization applies to these)
    tail_programs: int  # short extra programs (fp16 residual window, sinks); fixed cost only
    split: bool  # the context is split across programs (a combine pass follows)
    splits: int = 1  # programs a row's context is split across


def flash_split_count(rows: int, slots: int, n_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's `num_splits_heuristic(batch * heads * m_blocks, 2 * SMs, n_blocks, 128)`."""
    if rows >= 0.8 * slots:
        return 1
    max_splits = min(max_splits, slots, n_blocks)

    def eligible(s: int) -> bool:
        return s == 1 or math.ceil(n_blocks / s) != math.ceil(n_blocks / (s - 1))

    eff = {}
    for s in range(1, max_splits + 1):
        if eligible(s):
            w = rows * s / slots
            eff[s] = w / math.ceil(w)
    best = max(eff.values())
    return next(s for s in sorted(eff) if eff[s] >= 0.85 * best)


def flash_block_n(head_dim: int) -> int:
    return 256 if head_dim <= 64 else (128 if head_dim <= 128 else 64)


def launch(
    grid: str,
    batch: int,
    q_heads: int,
    kv_heads: int,
    context: int,
    head_dim: int,
    sms: int,
    block_tokens: int = 0,
    split_waves: int = 0,
    tail_programs_per_row: int = 0,
    resident: int = 0,
) -> Launch:
    """The grid one decode-attention launch runs; `grid` is a KernelFit.grid ("" gives one program per row)."""
    if grid in ("kvq", "kvq-nofill"):
        rows = batch * kv_heads
        tiles = max(1, math.ceil(context / block_tokens))
        s = split_count(rows, tiles, sms, split_waves, fill=grid == "kvq", resident=resident)
        return Launch(rows * s, rows * tail_programs_per_row, s > 1, s)
    if grid == "flash":
        rows = batch * kv_heads * math.ceil((q_heads // kv_heads) / 64)
        s = flash_split_count(rows, 2 * sms, math.ceil(context / flash_block_n(head_dim)))
        return Launch(rows * s, 0, s > 1, s)
    return Launch(batch * kv_heads, 0, False)


def wave_factor(programs: int, sms: int, programs_per_sm: int) -> float:
    """ceil(waves) / waves with waves = programs / (sms * programs_per_sm): the time of a partly filled
    last wave, as a factor on the streaming time; 1 when programs_per_sm is 0 (not modelled)."""
    if programs_per_sm <= 0 or programs <= 0:
        return 1.0
    w = programs / (sms * programs_per_sm)
    return math.ceil(w) / w
