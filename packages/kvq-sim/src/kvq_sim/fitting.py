"""Non-negative least squares for the few-parameter fits of calibrate (kernel families, decode steps) and
multigpu (collective costs per layout)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .errors import SimInputError

#: Residuals within TIE_RTOL of the best so far, or within TIE_RTOL * |y|^2 of it, are a tie (rounding, not a
#: better fit)
TIE_RTOL = 1e-9


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a few columns: the best unconstrained fit over every
    subset of columns whose coefficients are all >= 0 (2^k - 1 small solves; k <= 4 here).

    Subsets are tried fewest columns first, then in column order, and a later one replaces the best only when
    its residual is lower by more than the TIE_RTOL margin. Collinear columns (a kernel family's key/value and query
    element counts are proportional when every point has the same head layout) then give one answer, the
    earlier column, instead of whichever rounding in the linear-algebra library favours."""
    best, best_x = math.inf, None
    k, floor = a.shape[1], TIE_RTOL * float(y @ y)
    for cols in itertools.chain.from_iterable(itertools.combinations(range(k), n) for n in range(1, k + 1)):
        cols = list(cols)
        try:
            c, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        except np.linalg.LinAlgError as e:  # the inputs are checked finite and positive, so this is a bug
            raise SimInputError(f"least-squares fit failed ({e}); the measurements cannot be fitted") from None
        if (c < 0).any():
            continue
        x = np.zeros(a.shape[1])
        x[cols] = c
        r = float(((a @ x - y) ** 2).sum())
        if best_x is None or r < best - TIE_RTOL * best - floor:
            best, best_x = r, x
    if best_x is None:
        raise SimInputError("no non-negative fit exists for these measurements")
    return best_x
