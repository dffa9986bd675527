"""Row helpers of the denoising kernels (model/kernels_dn.py, model/kernels_guided.py).

Every inner loop is a function of its own over 1-D arrays: numba then vectorises it (the same
loop written inline over rows of 2-D arrays was not vectorised: docs/performance.md, "The
denoising stage").
"""

import numpy as np

from .kernels import _compile

kernel, serial = _compile(parallel=True), _compile(parallel=False)
# error_model="numpy": the helpers divide only by positive counts, and a zero check per
# division would keep their loops scalar
fused = _compile(parallel=False, fastmath={"contract"}, error_model="numpy")

THIRD = np.float32(1 / 3)


@fused
def _fill(dst, value):
    for j in range(dst.shape[0]):
        dst[j] = value


@fused
def _add(acc, p):
    for x in range(acc.shape[0]):
        acc[x] += p[x]


@_compile(parallel=False, fastmath={"contract", "reassoc"})
def _sum(p):
    """A vectorised (reassociated) sum."""
    total = np.float32(0)
    for x in range(p.shape[0]):
        total += p[x]
    return total


@fused
def _divide(num, den, dst):
    for j in range(dst.shape[0]):
        dst[j] = num[j] / den[j]


@fused
def _multiply(a, b, dst):
    for j in range(dst.shape[0]):
        dst[j] = a[j] * b[j]


@fused
def _reciprocal(p):
    for j in range(p.shape[0]):
        p[j] = np.float32(1) / p[j]


@fused
def _lerp(a, b, wb, dst):
    wa = np.float32(1) - wb
    for x in range(dst.shape[0]):
        dst[x] = a[x] * wa + b[x] * wb


@fused
def _sum4(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[4 * j] + src[4 * j + 1] + src[4 * j + 2] + src[4 * j + 3]


@fused
def _add_strided(dst, src, start, step):
    for j in range(dst.shape[0]):
        dst[j] += src[start + j * step]


@fused
def _cell_reduce(acc, cell, dst):
    """dst[j] = sum of acc over cell j: one strided pass per offset in the cell."""
    W, full = acc.shape[0], acc.shape[0] // cell
    if cell == 4:
        _sum4(acc, dst[:full])
    else:
        _fill(dst, np.float32(0))
        for k in range(cell):
            _add_strided(dst[:full], acc, k, cell)
    if full < dst.shape[0]:  # a last, partial cell
        dst[full] = np.float32(0)
        for x in range(full * cell, W):
            dst[full] += acc[x]


@fused
def _to_float(px, f):
    """f = px / 255: a channels-last row of 3 W uint8 values."""
    inv = np.float32(1 / 255)
    for x in range(px.shape[0]):
        f[x] = np.float32(px[x]) * inv


@fused
def _luma(f, lum):
    """L = (R + G + B) / 3 from interleaved floats."""
    for x in range(lum.shape[0]):
        lum[x] = (f[3 * x] + f[3 * x + 1] + f[3 * x + 2]) * THIRD


@fused
def _luv(px, x):
    """L = (R + G + B) / 3, R - L and B - L of pixel x of a channels-last uint8 row, in [0, 1]
    units (a helper of loops over pixels: inlined, they vectorise)."""
    inv = np.float32(1 / 255)
    r, g, b = (
        np.float32(px[3 * x]) * inv,
        np.float32(px[3 * x + 1]) * inv,
        np.float32(px[3 * x + 2]) * inv,
    )
    lum = (r + g + b) * THIRD
    return lum, r - lum, b - lum


@serial
def weighted_rows(img, rows, wr, wc):
    """sum over r, x of img[n, rows[r], x] * wr[r] * wc[x] per n: img (N, H, L) uint8 -> (N,)"""
    out = np.zeros(img.shape[0], np.float64)
    f = np.empty(img.shape[2], np.float32)
    for n in range(img.shape[0]):
        for r in range(rows.shape[0]):
            _to_float(img[n, rows[r]], f)
            out[n] += wr[r] * _dot(f, wc)
    return out * 255


@_compile(parallel=False, fastmath={"contract", "reassoc"})
def _dot(a, b):
    total = np.float32(0)
    for x in range(a.shape[0]):
        total += a[x] * b[x]
    return total
