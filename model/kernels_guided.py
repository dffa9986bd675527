"""The denoising stage's coefficients at cell resolution (model/denoise.py's `coefficients`):
window sums, the guided filter's (a, b) and their window means, the noise the curve added per
cell. One launch per call; model/kernels_dn.py runs the passes over the pixels around it.
"""

import numpy as np

from .kernels import prange
from .kernels_rows import (
    THIRD,
    _add,
    _divide,
    _fill,
    _lerp,
    _multiply,
    _reciprocal,
    fused,
    kernel,
    serial,
)


@fused
def _window_sums(p, radius, out, tmp):
    """out[i, j] = the sum of p (h, w) over the cells within `radius` of (i, j), zero outside:
    down the columns whole rows at a time, then along each row, shifted copies added."""
    h, w = p.shape
    for i in range(h):
        _fill(tmp[i], np.float32(0))
        for k in range(max(0, i - radius), min(h, i + radius + 1)):
            _add(tmp[i], p[k])
    for i in range(h):
        _fill(out[i], np.float32(0))
        for d in range(-radius, radius + 1):
            lo, hi = max(0, -d), min(w, w - d)  # j with 0 <= j + d < w
            if lo < hi:
                _add(out[i, lo:hi], tmp[i, lo + d : hi + d])


@serial
def _guided(pixels, cells, total, squares, noise2, k, radius, coef_a, coef_b, work):
    """One plane's self-guided filter at cell resolution: a = var / (var + k noise^2),
    b = m - a m over each window, then (A, B) their means over each window of cells.
    pixels, cells: 1 / the window sums of the pixel counts and of ones (multiplying by a
    reciprocal instead of dividing: docs/performance.md, "The denoising stage"); work: (5, h, w)
    scratch."""
    h = pixels.shape[0]
    m, var, a, b, tmp = work[0], work[1], work[2], work[3], work[4]
    _window_sums(total, radius, m, tmp)
    _window_sums(squares, radius, var, tmp)
    for i in range(h):
        _ab_row(pixels[i], m[i], var[i], noise2[i], k, a[i], b[i])
    _window_sums(a, radius, m, tmp)
    _window_sums(b, radius, var, tmp)
    for i in range(h):
        _multiply(m[i], cells[i], coef_a[i])
        _multiply(var[i], cells[i], coef_b[i])


@fused
def _ab_row(inv_c, m, var, noise2, k, a, b):
    """The guided filter's a = var / (var + k noise^2), b = mean - a mean, from window sums
    and 1 / the window's pixel count."""
    for j in range(a.shape[0]):
        mean = m[j] * inv_c[j]
        v = max(var[j] * inv_c[j] - mean * mean, np.float32(0))
        eps = k * noise2[j]
        aj = v / (v + eps) if eps > 0 else np.float32(1)  # no added noise: the identity
        a[j], b[j] = aj, mean - aj * mean


@fused
def _noise2(sums, count, sigma, r, cy0, cy1, cly, cx0, cx1, clx, steps, out, i0, i1):
    """(g^2 - 1) sigma^2 per cell of rows i0 to i1 - 1: g the curve's slope (`cell_gain`) at the
    cell's mean input luma, for the factor map (mean of the channels) at the cell's centre."""
    wc = out.shape[1]
    h = r.shape[1]
    rm = (r[0] + r[1] + r[2]) * THIRD  # (h, w)
    cols = np.empty((h, wc), np.float32)
    for i in range(h):
        for j in range(wc):
            cols[i, j] = rm[i, cx0[j]] * (1 - clx[j]) + rm[i, cx1[j]] * clx[j]
    rc, x = np.empty(wc, np.float32), np.empty(wc, np.float32)
    for i in range(i0, i1):
        _lerp(cols[cy0[i]], cols[cy1[i]], cly[i], rc)
        _divide(sums[i], count[i], x)
        _gain_noise(x, rc, sigma, steps, out[i])


@fused
def _gain_noise(x, r, sigma, steps, out):
    """out = (g^2 - 1) sigma^2, g the chained slope of `steps` RIE steps at x (curve_gain)."""
    _fill(out, np.float32(1))
    for _ in range(steps):
        _slope_step(out, x, r)
    for j in range(out.shape[0]):
        out[j] = max(out[j] * out[j] - 1, np.float32(0)) * sigma * sigma


@fused
def _slope_step(g, x, r):
    for j in range(g.shape[0]):
        g[j] = g[j] * (1 + r[j] * (2 * x[j] - 1))
        x[j] = x[j] + r[j] * (x[j] * x[j] - x[j])


@kernel
def coefficients(
    sums,
    count,
    windows,
    sigma,
    r_low,
    cy0,
    cy1,
    cly,
    cx0,
    cx1,
    clx,
    k_luma,
    k_chroma,
    radius_luma,
    radius_chroma,
    steps,
    coef,
    work,
):
    """coef (N, 6, hc, wc): (A, B) of L, R - L, B - L. r_low (n_r, 3, h, w): image n uses map
    n % n_r, read at each cell's centre (taps cy*, cx*). windows: `window_reciprocals`. Per
    image, the noise in two halves of rows, then one job per plane. work: (N, 3, 5, hc, wc) +
    (1, hc, wc) float32 scratch, passed in so that it is not page-faulted afresh every call."""
    n_img, _, hc, wc = sums.shape
    scratch, noise2 = work[: n_img * 15].reshape(n_img, 3, 5, hc, wc), work[n_img * 15]
    for n in range(n_img):
        for half in prange(2):
            _noise2(
                sums[n, 6],
                count,
                sigma[n],
                r_low[n % r_low.shape[0]],
                cy0,
                cy1,
                cly,
                cx0,
                cx1,
                clx,
                steps,
                noise2,
                half * hc // 2,
                (half + 1) * hc // 2,
            )
        for p in prange(3):
            k, radius, q = (k_luma, radius_luma, 0) if p == 0 else (k_chroma, radius_chroma, 1)
            _guided(
                windows[2 * q],
                windows[2 * q + 1],
                sums[n, p],
                sums[n, 3 + p],
                noise2,
                k,
                radius,
                coef[n, 2 * p],
                coef[n, 2 * p + 1],
                scratch[n, p],
            )


def scratch_size(n_img: int) -> int:
    """Planes of (hc, wc) that `coefficients` needs as `work`."""
    return n_img * 15 + 1


@serial
def window_reciprocals(count, radius_luma, radius_chroma):
    """1 / the window sums of the pixel counts and of ones, for both radii: (4, hc, wc). They
    depend on the image's size only (kept per size by kernels_dn)."""
    hc, wc = count.shape
    out = np.empty((4, hc, wc), np.float32)
    ones, tmp = np.ones((hc, wc), np.float32), np.empty((hc, wc), np.float32)
    for q in range(2):
        radius = radius_luma if q == 0 else radius_chroma
        _window_sums(count, radius, out[2 * q], tmp)
        _window_sums(ones, radius, out[2 * q + 1], tmp)
    _reciprocal(out.reshape(-1))
    return out
