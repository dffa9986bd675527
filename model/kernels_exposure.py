"""The exposure bisection's numba kernels (model/exposure.py's `mean_after` and `solve`):
imported on first use, so that `import model` does not import numba."""

import numpy as np

from .exposure import ITERATIONS
from .kernels_rows import _sum, fused, serial


@serial
def mean_after(x: np.ndarray, r: np.ndarray, offset: float, steps: int, work: np.ndarray) -> float:
    """Mean of RIE(x, clamp(r + offset)) for one image's samples x, r (flat float32); work:
    two scratch arrays of x's length."""
    rr, v = work[0], work[1]
    _shift(r, np.float32(offset), rr, x, v)
    for _ in range(steps):
        _step(v, rr)
    return _sum(v) / v.shape[0]


@fused
def _shift(r, offset, rr, x, v):
    lo, hi = np.float32(-1), np.float32(1)
    for i in range(r.shape[0]):
        rr[i] = min(max(r[i] + offset, lo), hi)
        v[i] = x[i]


@fused
def _step(v, r):
    for i in range(v.shape[0]):  # Eq. 1
        v[i] = v[i] + r[i] * (v[i] * v[i] - v[i])


@serial
def solve(x: np.ndarray, r: np.ndarray, target: float, steps: int, floor: bool) -> float:
    """Bisection for one image: the offset whose mean output is `target`."""
    work = np.empty((2, x.shape[0]), np.float32)
    if floor and mean_after(x, r, 0.0, steps, work) >= target:
        return 0.0
    lo, hi = -2.0, 2.0  # brighter at lo
    for _ in range(ITERATIONS):
        mid = (lo + hi) / 2
        if mean_after(x, r, mid, steps, work) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
