"""The recursive filter of model/temporal.py as numba kernels (temporal.filter_reference is the
torch reference they are tested against). Channels-last rows: (H, 3 W)."""

import numpy as np

from .denoise import NOISE_BLOCK, noise_rows
from .kernels import prange
from .kernels_dn import _block_scale, _immerkaer, _quantile
from .kernels_rows import _add, _luma, _sum, _to_float, fused, kernel, serial

THIRD = np.float32(1 / 3)


BAND = 16  # rows per job: a band's differences (and its halo's) stay in cache for the update


@kernel
def recursive_filter(frame, acc, new, out, k, radius, min_weight):
    """frame, out (H, 3W) uint8; acc (H, 3W) float32 running average, read; new: the next
    one, written (two buffers: a band reads its neighbours' rows of the old average while
    they are being updated). One pass of bands: each computes the differences of its rows and
    a halo of `radius` rows, then updates its rows."""
    H, WC = frame.shape
    W = WC // 3
    inv = np.empty(W, np.float32)  # 1 / (k * the window's width at x)
    for x in range(W):
        inv[x] = np.float32(1) / (k * np.float32(min(x + radius + 1, W) - max(x - radius, 0)))
    for band in prange((H + BAND - 1) // BAND):
        _band(frame, acc, new, out, radius, min_weight, inv, band * BAND, min(H, (band + 1) * BAND))


@serial
def _band(frame, acc, new, out, radius, min_weight, inv, y0, y1):
    H, WC = frame.shape
    W = WC // 3
    lo, hi = max(0, y0 - radius), min(H, y1 + radius)
    rows = np.empty((hi - lo, W), np.float32)
    d = np.empty(W, np.float32)
    for y in range(lo, hi):
        _difference(frame[y], acc[y], d)
        _box_row(d, rows[y - lo], radius)
    w = np.empty(W, np.float32)
    w3 = np.empty(WC, np.float32)
    for y in range(y0, y1):
        a, b = max(0, y - radius), min(H, y + radius + 1)
        w[:] = 0
        for j in range(a, b):
            _add(w, rows[j - lo])
        _weight(w, inv, np.float32(1 / (b - a)), min_weight, w3)
        _update(frame[y], acc[y], new[y], out[y], w3)


@fused
def _difference(f, a, d):
    """d = mean over the 3 channels of (frame - acc)."""
    for x in range(d.shape[0]):
        d[x] = (
            np.float32(f[3 * x])
            - a[3 * x]
            + np.float32(f[3 * x + 1])
            - a[3 * x + 1]
            + np.float32(f[3 * x + 2])
            - a[3 * x + 2]
        ) * THIRD


@fused
def _box_row(d, dst, radius):
    """dst[x] = sum of d over [x - radius, x + radius] inside the row (a running sum)."""
    W = d.shape[0]
    s = np.float32(0)
    for x in range(min(radius, W)):
        s += d[x]
    for x in range(W):
        if x + radius < W:
            s += d[x + radius]
        if x - radius - 1 >= 0:
            s -= d[x - radius - 1]
        dst[x] = s


@fused
def _weight(w, inv, row_scale, min_weight, w3):
    """The new frame's share, clamp(|mean difference| / k, min_weight, 1), for each value."""
    for x in range(w.shape[0]):
        v = min(max(abs(w[x]) * row_scale * inv[x], min_weight), np.float32(1))
        w3[3 * x] = v
        w3[3 * x + 1] = v
        w3[3 * x + 2] = v


@fused
def _update(f, a, new, o, w):
    for i in range(w.shape[0]):
        v = a[i] + w[i] * (np.float32(f[i]) - a[i])
        new[i] = v
        o[i] = np.uint8(min(max(v + np.float32(0.5), np.float32(0)), np.float32(255)))


def noise_sigma(img: np.ndarray, cell: int, quantile: float) -> np.ndarray:
    """denoise.noise_sigma on channels-last rows img (N, H, 3W) uint8: (N,) float32."""
    n, H, WC = img.shape
    W = WC // 3
    rows = noise_rows(H, cell)
    if not len(rows) or W < 3:
        return np.zeros(n, np.float32)
    sums = np.empty((n, len(rows), -(-W // NOISE_BLOCK)), np.float32)
    immerkaer_rows(img, rows, sums)
    scale, valid = _block_scale(W)
    means = (sums * scale)[..., valid].reshape(n, -1)
    return np.array([_quantile(m, quantile) for m in means], np.float32)


@kernel
def immerkaer_rows(img, rows, sums):
    """sums (N, len(rows), blocks): per row y of `rows`, |L * N| on rows y - 1, y, y + 1 summed
    over each block of NOISE_BLOCK columns (kernels_dn._stats_job's noise, on its own)."""
    n_img, n_rows = sums.shape[:2]
    for job in prange(n_img * n_rows):
        _immerkaer_job(img, rows, sums, job // n_rows, job % n_rows)


@serial
def _immerkaer_job(img, rows, sums, n, i):
    WC = img.shape[2]
    W = WC // 3
    f = np.empty(WC, np.float32)
    lum = np.empty((4, W), np.float32)
    y = rows[i]
    for k in range(3):
        _to_float(img[n, y - 1 + k], f)
        _luma(f, lum[k])
    _immerkaer(lum[0], lum[1], lum[2], lum[3])
    for b in range(sums.shape[2]):
        sums[n, i, b] = _sum(lum[3, b * NOISE_BLOCK : (b + 1) * NOISE_BLOCK])
