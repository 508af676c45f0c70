"""Non-negative least squares for the few-parameter fits of calibrate (kernel families, decode steps) and
multigpu (collective costs per layout)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .errors import SimInputError


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a few columns: the best unconstrained fit over every
    subset of columns whose coefficients are all >= 0 (2^k - 1 small solves; k <= 4 here)."""
    best, best_x = math.inf, None
    for mask in itertools.product((False, True), repeat=a.shape[1]):
        cols = [i for i, m in enumerate(mask) if m]
        if not cols:
            continue
        try:
            c, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        except np.linalg.LinAlgError as e:  # the inputs are checked finite and positive, so this is a bug
            raise SimInputError(f"least-squares fit failed ({e}); the measurements cannot be fitted") from None
        if (c < 0).any():
            continue
        x = np.zeros(a.shape[1])
        x[cols] = c
        r = float(((a @ x - y) ** 2).sum())
        if r < best:
            best, best_x = r, x
    if best_x is None:
        raise SimInputError("no non-negative fit exists for these measurements")
    return best_x
