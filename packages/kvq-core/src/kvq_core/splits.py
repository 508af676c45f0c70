"""How many splits of the context a split-KV decode launch runs: one torch-free rule, used by the kernels'
launchers (kvq_kernels._launch.num_splits) and by the simulator's launch grids (kvq_sim.grids.launch)."""

from __future__ import annotations

import math

#: A last wave within 2% of the fullest one counts as full: among near-ties the fewest splits win.
FILL_TOLERANCE = 0.02
#: One wave of resident programs is taken when it fills at least this share of the slots (see split_count).
ONE_WAVE_MIN_FULLNESS = 0.9


def _kept_counts(tiles: int, lo: int, hi: int) -> list[int]:
    """Split counts that whole-tile split sizes give, from trying lo .. hi splits: ceil(tiles / ceil(tiles / s))."""
    return sorted({math.ceil(tiles / math.ceil(tiles / s)) for s in range(lo, hi + 1)})


def split_count(programs_per_split: int, tiles: int, sms: int, waves: int, fill: bool = True, resident: int = 1) -> int:
    """Splits of a context of `tiles` tiles (ceil(tokens / BLOCK_N), at least 1) for a launch of
    `programs_per_split` programs per split (B * H_kv) on `sms` SMs, each holding `resident` programs at once.

    `want` = ceil(waves * sms / programs_per_split): splits for about `waves` waves of programs, at most
    one split per tile and at least one. With `fill`, among want .. 2 * want (only the counts the kernels'
    whole-tile split sizes keep: ceil(tiles / ceil(tiles / s))) the smallest whose last wave of sms * resident
    programs is fullest within FILL_TOLERANCE: a partly filled last wave idles SMs. H100 sweeps: the
    tensor-core and fp16 kernels run up to 10% faster with `fill` (GQA at batch 8: 10 splits, 4.85 waves of
    132 programs, against 9 splits, 4.36 waves); the CUDA-core kernel, several programs per SM, up to 12%
    slower (MHA batch 1, 16K: 37 splits against 32), so it runs without `fill`.

    With `fill` and resident >= 2, one wave comes first: the most splits whose programs all fit on the SMs at
    once, when they fill at least ONE_WAVE_MIN_FULLNESS of the slots or as much as the waves rule's last wave. H200 split sweeps (GQA 32/8, fragment
    and word kernels holding 2-4 programs an SM, reports/measurements/splits_*_h200.csv): one wave 0.97 full
    beat every count tried, among them two waves equally full (8-bit at batch 1, 128K: 48 splits 114 us, 96
    splits 124 us) and the 1.24 waves that counting one program per SM chose (4-bit at batch 1, 256K: 64
    splits 185 us, 82 splits 277 us).

    Worked example, GQA 32/8 at batch 8 on 132 SMs, 1024 tiles, 4 waves: 64 programs per split, want =
    ceil(4 * 132 / 64) = 9 (4.36 waves: the last one 36% busy, fullness 4.36 / 5 = 0.87); of 9 .. 18
    splits, 10, 12, 14, 16 and 18 all reach fullness 0.97 (10: 4.85 waves), so 10. Without `fill`: 9. With
    3 resident programs an SM (396 slots): 6 splits (384 programs, 0.97 of one wave).
    """
    pps = max(programs_per_split, 1)
    want = math.ceil(waves * sms / pps)
    if not fill:
        return max(1, min(tiles, want))
    slots = sms * max(resident, 1)
    lo = max(1, min(tiles, want))
    hi = max(lo, min(tiles, 2 * want))

    def fullness(s: int) -> float:  # fraction of the last wave of `slots` programs that is busy
        w = pps * s / slots
        return w / math.ceil(w)

    kept = _kept_counts(tiles, lo, hi)
    best = max(fullness(s) for s in kept)
    waves_pick = next(s for s in kept if fullness(s) >= best - FILL_TOLERANCE)
    if resident >= 2 and pps <= slots:
        most = min(tiles, slots // pps)
        one = math.ceil(tiles / math.ceil(tiles / most))  # the most splits of whole tiles, at most `most`
        if fullness(one) >= min(ONE_WAVE_MIN_FULLNESS, fullness(waves_pick)):
            return one
    return waves_pick
