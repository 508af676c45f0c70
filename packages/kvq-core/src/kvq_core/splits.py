"""How many splits of the context a split-KV decode launch runs: one torch-free rule, used by the kernels'
launchers (kvq_kernels._launch.num_splits) and by the simulator's launch grids (kvq_sim.grids.launch)."""

from __future__ import annotations

import math

#: A last wave within 2% of the fullest one counts as full: among near-ties the fewest splits win.
FILL_TOLERANCE = 0.02


def split_count(programs_per_split: int, tiles: int, sms: int, waves: int, fill: bool = True, resident: int = 1) -> int:
    """Splits of a context of `tiles` tiles (ceil(tokens / BLOCK_N), at least 1) for a launch of
    `programs_per_split` programs per split (B * H_kv) on `sms` SMs.

    `want` = ceil(waves * sms / programs_per_split): splits for about `waves` waves of programs, at most
    one split per tile and at least one. With `fill`, among want .. 2 * want (only the counts the kernels'
    whole-tile split sizes keep: ceil(tiles / ceil(tiles / s))) the smallest whose last wave is fullest
    within FILL_TOLERANCE: a partly filled last wave idles SMs. H100 sweeps: the tensor-core and fp16
    kernels (one resident program per SM) run up to 10% faster with `fill` (GQA at batch 8: 10 splits, 4.85
    waves of 132 programs, against 9 splits, 4.36 waves); the CUDA-core kernel, several programs per SM, up
    to 12% slower (MHA batch 1, 16K: 37 splits against 32), so it runs without `fill`.

    Worked example, GQA 32/8 at batch 8 on 132 SMs, 1024 tiles, 4 waves: 64 programs per split, want =
    ceil(4 * 132 / 64) = 9 (4.36 waves: the last one 36% busy, fullness 4.36 / 5 = 0.87); of 9 .. 18
    splits, 10, 12, 14, 16 and 18 all reach fullness 0.97 (10: 4.85 waves), so 10. Without `fill`: 9.
    """
    pps = max(programs_per_split, 1)
    want = math.ceil(waves * sms / pps)
    if not fill:
        return max(1, min(tiles, want))
    lo = max(1, min(tiles, want))
    hi = max(lo, min(tiles, 2 * want))

    slots = sms * max(resident, 1)

    def fullness(s: int) -> float:  # fraction of the last wave of `slots` programs that is busy
        w = pps * s / slots
        return w / math.ceil(w)

    kept = sorted({math.ceil(tiles / math.ceil(tiles / s)) for s in range(lo, hi + 1)})
    best = max(fullness(s) for s in kept)
    return next(s for s in kept if fullness(s) >= best - FILL_TOLERANCE)
