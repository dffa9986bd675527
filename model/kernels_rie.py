"""The numba backend's full-size pass (model/backends/numba_fused.py): factor upsampling, the
eight RIE steps and rounding to uint8, one read of the image and one write; the denoising
stage (model/kernels_dn.py) runs the same rows fused with its statistics.
"""

import numpy as np

from .kernels import _compile, fused, kernel, prange, serial
from .rie import STEPS

ROWS = 8  # image rows per work item of rie_uint8: enough work to amortise scheduling


@kernel
def rie_uint8(img, r_low, y0, y1, ly, x0, x1, lx, steps, out):
    """out = round(255 * RIE(img / 255, upsample(r_low))): one read of img, one write of out.

    img and out are (N, H, W * C), the C channels of a pixel side by side; r_low is
    (n_r, C, h, w) and image n takes factor map n % n_r. A channels-last batch passes as it is;
    a planar (N, C, H, W) one as N * C one-channel images with the maps as n_r * C one-channel
    maps (same arithmetic per value, so both layouts give identical results). The factor is
    upsampled along rows first, at EFE's height (1/12 of the work), into rows interleaved like
    the image, so the full-size loop over a row is one contiguous pass. Same order of
    operations as PyTorch's bilinear kernel."""
    n_img, H, _ = img.shape
    rows = factor_rows(r_low, x0, x1, lx, img.shape[2])
    n_blocks = (H + ROWS - 1) // ROWS
    for job in prange(n_img * n_blocks):
        n, blk = job // n_blocks, job % n_blocks
        rie_rows(img, rows, y0, y1, ly, steps, out, n, blk * ROWS, min(H, blk * ROWS + ROWS))


@serial
def factor_rows(r_low, x0, x1, lx, WC):
    """(n_r, h, WC): each row of the factor maps upsampled along x, channels interleaved like
    the image's rows (rie_uint8)."""
    n_r, ch, h, _ = r_low.shape
    one = np.float32(1)
    rows = np.empty((n_r, h, WC), np.float32)
    for job in range(n_r * h):  # small: not worth a fork/join
        n, j = job // h, job % h
        dst = rows[n, j]
        for c in range(ch):
            src = r_low[n, c, j]
            for x in range(WC // ch):
                dst[x * ch + c] = src[x0[x]] * (one - lx[x]) + src[x1[x]] * lx[x]
    return rows


@serial
def rie_rows(img, rows, y0, y1, ly, steps, out, n, ya, yb):
    """Rows ya to yb - 1 of image n: RIE with the factor between `factor_rows` rows."""
    one = np.float32(1)
    nr = n % rows.shape[0]
    v = np.empty(img.shape[2], np.float32)  # one row of RIE's float output
    for y in range(ya, yb):
        ra, rb, wa, wb = rows[nr, y0[y]], rows[nr, y1[y]], one - ly[y], ly[y]
        if steps == STEPS:
            _rie_row_fixed(img[n, y], ra, rb, wa, wb, v)
        else:
            _rie_row(img[n, y], ra, rb, wa, wb, steps, v)
        _round_row(v, out[n, y])


@_compile(parallel=False, fastmath={"contract"})
def _rie_row_fixed(src, ra, rb, wa, wb, v):
    """One row, STEPS steps, into floats v: a loop count known when compiling lets the compiler
    unroll the steps and keep each pixel in a register, so the loop over x vectorises.
    Multiply-adds may fuse (one rounding instead of two), and the input is scaled by 1/255
    instead of divided by 255 (a vector division is slow: docs/performance.md, "One pass for
    the rest"): still within 1 grey level of the reference. Rounding to uint8 in a loop of its
    own (`_round_row`) took 0.7x the time of rounding here (docs/performance.md, ibid.)."""
    inv = np.float32(1) / np.float32(255)
    for x in range(src.shape[0]):
        r = ra[x] * wa + rb[x] * wb
        p = np.float32(src[x]) * inv
        for _ in range(STEPS):  # Eq. 1: x_t = x_{t-1} + x_r * (x_{t-1}^2 - x_{t-1})
            p = p + r * (p * p - p)
        v[x] = p


@fused
def _round_row(v, dst):
    """dst = round(255 * clip(v, 0, 1)) as uint8."""
    zero, one, s = np.float32(0), np.float32(1), np.float32(255)
    for x in range(v.shape[0]):
        dst[x] = np.uint8(np.rint(min(max(v[x], zero), one) * s))


@serial
def _rie_row(src, ra, rb, wa, wb, steps, v):
    """One row, any number of steps, into floats v: each step a pass over the row (in L1)."""
    inv = np.float32(1) / np.float32(255)  # as in _rie_row_fixed
    W = src.shape[0]
    r = np.empty(W, np.float32)
    for x in range(W):
        r[x] = ra[x] * wa + rb[x] * wb
        v[x] = np.float32(src[x]) * inv
    for _ in range(steps):  # Eq. 1
        for x in range(W):
            v[x] = v[x] + r[x] * (v[x] * v[x] - v[x])
