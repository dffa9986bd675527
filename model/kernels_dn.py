"""The numba kernels of the denoising stage (model/denoise.py is the reference they follow).

Three launches after RIE's fused pass: `cell_stats` reads the input and RIE's uint8 output once
and sums each cell's luma, chroma, their squares and the input's luma, plus Immerkaer's sums on
one input row per cell row; `coefficients` runs the guided filter at cell resolution (1/16 of
the pixels: box sums from integral images); `apply` upsamples the filter's (A, B) and rewrites
the output in place, q = A p + B on L, R - L, B - L. Images are (N, H, W, 3) uint8 views
(channels-last batches contiguous, planar ones strided).
"""
import threading

import numpy as np

from .denoise import (IMMERKAER, NOISE_BLOCK, DenoiseConfig, block_counts, cell_taps,
                      centre_taps, noise_rows)
from .kernels import ROWS, _compile, prange

kernel, serial = _compile(parallel=True), _compile(parallel=False)
fused = _compile(parallel=False, fastmath={"contract"})

STATS_BAND = 8  # cell rows per job of `cell_stats`
APPLY_ROWS = 32  # image rows per job of `apply`: each upsamples ~APPLY_ROWS / cell + 2 cell rows
PLANES = 7  # cell sums: L, R-L, B-L, their squares, the input's luma
THIRD = np.float32(1 / 3)


@kernel
def cell_stats(img, out, cell, sums, noise):
    """sums (N, PLANES, hc, wc) float32, noise (N, hc, blocks) float32: per cell row, the sums
    of |L * N| over each block of NOISE_BLOCK columns of its row at offset 1
    (model/denoise.py, `noise_sigma`). img, out: (N, H, 3 W)
    uint8, channels-last rows; cell even, >= 4. Each row's values are summed per pixel into
    buffers (one store per loop, contiguous: it vectorises), then per cell."""
    n_img, hc = img.shape[0], sums.shape[2]
    bands = (hc + STATS_BAND - 1) // STATS_BAND
    for job in prange(n_img * bands):  # the body is its own function: kept out of numba's
        _stats_job(img, out, cell, sums, noise, job // bands, job % bands)  # parfor passes


@serial
def _stats_job(img, out, cell, sums, noise, n, band):
    H, WC = img.shape[1:]
    W = WC // 3
    acc = np.empty((PLANES, W), np.float32)
    f = np.empty(WC, np.float32)
    planes = np.empty((3, W), np.float32)
    lum = np.empty((3, W), np.float32)  # the input's luma at rows 0, 2 and 1 of the cell
    for i in range(band * STATS_BAND, min(sums.shape[2], (band + 1) * STATS_BAND)):
        _fill(acc.reshape(-1), np.float32(0))
        for y in range(i * cell, min(H, (i + 1) * cell), 2):  # even rows (denoise._cell_sums)
            _planes(out[n, y], f, planes[0], planes[1], planes[2])
            for p in range(3):
                _add_both(acc[p], acc[3 + p], planes[p])
            k = min((y - i * cell) // 2, 1)
            _to_float(img[n, y], f)
            _luma(f, lum[k])
            _add(acc[6], lum[k])
        for p in range(PLANES):
            _cell_reduce(acc[p], cell, sums[n, p, i])
        y = i * cell + 1  # Immerkaer's row, between the two even rows kept in lum
        _fill(noise[n, i], np.float32(0))
        if y < H - 1 and W > 2:
            _to_float(img[n, y], f)
            _luma(f, lum[2])
            _immerkaer(lum[0], lum[2], lum[1], planes[0])
            for b in range(noise.shape[2]):
                noise[n, i, b] = _sum(planes[0, b * NOISE_BLOCK:(b + 1) * NOISE_BLOCK])


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


# Every inner loop is a function of its own over 1-D arrays: numba then vectorises it (the same
# loop written inline over rows of 2-D arrays ran ~15x slower, measured on this machine).
@fused
def _fill(dst, value):
    for j in range(dst.shape[0]):
        dst[j] = value


@fused
def _sum4(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[4 * j] + src[4 * j + 1] + src[4 * j + 2] + src[4 * j + 3]


@fused
def _add_strided(dst, src, start, step):
    for j in range(dst.shape[0]):
        dst[j] += src[start + j * step]


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
def _planes(px, f, lum, u, v):
    """L, R - L, B - L of a channels-last uint8 row, in [0, 1] units (one loop per plane)."""
    _to_float(px, f)
    _luma(f, lum)
    for x in range(lum.shape[0]):
        u[x] = f[3 * x] - lum[x]
    for x in range(lum.shape[0]):
        v[x] = f[3 * x + 2] - lum[x]


@fused
def _add(acc, p):
    for x in range(acc.shape[0]):
        acc[x] += p[x]


@fused
def _add_both(acc, acc2, p):
    """acc += p, acc2 += p^2."""
    for x in range(acc.shape[0]):
        acc[x] += p[x]
        acc2[x] += p[x] * p[x]


@fused
def _immerkaer(up, mid, down, dst):
    """dst[x] = |L * N| at x = 1 .. W - 2, 0 at both ends."""
    W = mid.shape[0]
    dst[0], dst[W - 1] = np.float32(0), np.float32(0)
    for x in range(1, W - 1):
        c = (up[x - 1] - 2 * up[x] + up[x + 1]
             - 2 * (mid[x - 1] - 2 * mid[x] + mid[x + 1])
             + down[x - 1] - 2 * down[x] + down[x + 1])
        dst[x] = abs(c)


@_compile(parallel=False, fastmath={"contract", "reassoc"})
def _sum(p):
    """A vectorised (reassociated) sum."""
    total = np.float32(0)
    for x in range(p.shape[0]):
        total += p[x]
    return total


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
                _add(out[i, lo:hi], tmp[i, lo + d:hi + d])


@serial
def _guided(pixels, cells, total, squares, noise2, k, radius, coef_a, coef_b, work):
    """One plane's self-guided filter at cell resolution: a = var / (var + k noise^2),
    b = m - a m over each window, then (A, B) their means over each window of cells.
    pixels, cells: 1 / the window sums of the pixel counts and of ones (multiplying by a
    reciprocal instead of dividing: 0.3 ms a plane at 1200x900); work: (5, h, w) scratch."""
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
        a[j] = v / (v + eps) if eps > 0 else np.float32(1)  # no added noise: the identity
        b[j] = mean - a[j] * mean


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
def _noise2(sums, count, sigma, r, cy0, cy1, cly, cx0, cx1, clx, steps, out):
    """(g^2 - 1) sigma^2 per cell: g the curve's slope (`cell_gain`) at the cell's mean input luma,
    for the factor map (mean of the channels) at the cell's centre."""
    hc, wc = out.shape
    h = r.shape[1]
    rm = (r[0] + r[1] + r[2]) * THIRD                                  # (h, w)
    cols = np.empty((h, wc), np.float32)
    for i in range(h):
        for j in range(wc):
            cols[i, j] = rm[i, cx0[j]] * (1 - clx[j]) + rm[i, cx1[j]] * clx[j]
    rc, x = np.empty(wc, np.float32), np.empty(wc, np.float32)
    for i in range(hc):
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
def coefficients(sums, count, sigma, r_low, cy0, cy1, cly, cx0, cx1, clx, k_luma, k_chroma,
                 radius_luma, radius_chroma, steps, coef, work):
    """coef (N, 6, hc, wc): (A, B) of L, R - L, B - L. r_low (n_r, 3, h, w): image n uses map
    n % n_r, read at each cell's centre (taps cy*, cx*). One job per image and plane.
    work: (N, 3, 5, hc, wc) + (5, hc, wc) float32 scratch, passed in so that it is not
    page-faulted afresh on every call."""
    n_img, _, hc, wc = sums.shape
    scratch, shared = work[:n_img * 15].reshape(n_img, 3, 5, hc, wc), work[n_img * 15:]
    noise2, windows = shared[0:1], shared[1:5]   # windows: pixels and cells for both radii
    ones, tmp = shared[5], shared[6]
    _fill(ones.reshape(-1), np.float32(1))
    for q, radius in enumerate((radius_luma, radius_chroma)):
        _window_sums(count, radius, windows[2 * q], tmp)
        _window_sums(ones, radius, windows[2 * q + 1], tmp)
    _reciprocal(windows.reshape(-1))
    for n in range(n_img):
        _noise2(sums[n, 6], count, sigma[n], r_low[n % r_low.shape[0]], cy0, cy1, cly, cx0,
                cx1, clx, steps, noise2[0])
        for p in prange(3):
            k, radius, q = (k_luma, radius_luma, 0) if p == 0 else (k_chroma, radius_chroma, 1)
            _guided(windows[2 * q], windows[2 * q + 1], sums[n, p], sums[n, 3 + p], noise2[0],
                    k, radius, coef[n, 2 * p], coef[n, 2 * p + 1], scratch[n, p])


def scratch_size(n_img: int) -> int:
    """Planes of (hc, wc) that `coefficients` needs as `work`."""
    return n_img * 15 + 7


@kernel
def apply(out, coef, cell, y0, y1, ly, x0, x1, lx):
    """out (N, H, 3 W) rewritten in place: q = A p + B per plane, (A, B) bilinear from the
    cell centres (taps y*, x*). Each job upsamples the coefficient rows it needs along x once
    (at cell-row resolution), so the per-pixel loops are contiguous."""
    n_img, H = out.shape[:2]
    n_blocks = (H + APPLY_ROWS - 1) // APPLY_ROWS
    for job in prange(n_img * n_blocks):
        _apply_job(out, coef, y0, y1, ly, x0, x1, lx, job // n_blocks, job % n_blocks)


@serial
def _apply_job(out, coef, y0, y1, ly, x0, x1, lx, n, blk):
    H, WC = out.shape[1:]
    W = WC // 3
    if True:
        ya, yb = blk * APPLY_ROWS, min(H, (blk + 1) * APPLY_ROWS)
        rows = np.empty((2, 6, W), np.float32)  # cell rows i in slot i % 2, along x
        held = np.full(2, -1, np.int64)
        f = np.empty(WC, np.float32)
        planes = np.empty((3, W), np.float32)
        for y in range(ya, yb):
            for i in (y0[y], y1[y]):
                if held[i % 2] != i:
                    held[i % 2] = i
                    for p in range(6):
                        _upsample_row(coef[n, p, i], x0, x1, lx, rows[i % 2, p])
            _planes(out[n, y], f, planes[0], planes[1], planes[2])
            ra, rb = rows[y0[y] % 2], rows[y1[y] % 2]
            for p in range(3):
                _filter(ra[2 * p], rb[2 * p], ra[2 * p + 1], rb[2 * p + 1], ly[y], planes[p])
            _store(planes[0], planes[1], planes[2], out[n, y])


@serial
def _upsample_row(src, x0, x1, lx, dst):
    """dst = src (cell values) upsampled to pixels at the taps (denoise.cell_taps)."""
    W, wc = dst.shape[0], src.shape[0]
    lo, hi = W, W
    end = min(wc - 1, W // 4)  # cells 1 .. end - 1 have both neighbours and 4 whole pixels
    if W <= 4 * wc < W + 4 and end > 1:  # cells of 4 (the default): _up4 between the ends
        _up4(src, dst, end)
        lo, hi = 4, 4 * end
    for x in range(lo):
        dst[x] = src[x0[x]] * (1 - lx[x]) + src[x1[x]] * lx[x]
    for x in range(hi, W):
        dst[x] = src[x0[x]] * (1 - lx[x]) + src[x1[x]] * lx[x]


@fused
def _up4(s, dst, end):
    """Cells of 4 pixels: pixel 4 j + k sits at cell j + (k - 1.5) / 4, so its weights depend on
    k alone (exact binary fractions, the same as the taps'). All four stores in one loop:
    the compiler vectorises an interleaved store group, not a strided single store."""
    a, b, c, d = np.float32(0.375), np.float32(0.625), np.float32(0.125), np.float32(0.875)
    for j in range(1, end):
        dst[4 * j] = s[j - 1] * a + s[j] * b
        dst[4 * j + 1] = s[j - 1] * c + s[j] * d
        dst[4 * j + 2] = s[j] * d + s[j + 1] * c
        dst[4 * j + 3] = s[j] * b + s[j + 1] * a


@fused
def _lerp(a, b, wb, dst):
    wa = np.float32(1) - wb
    for x in range(dst.shape[0]):
        dst[x] = a[x] * wa + b[x] * wb


@fused
def _filter(a0, a1, b0, b1, wb, p):
    """p = A p + B, (A, B) between two cell rows at weight wb."""
    wa = np.float32(1) - wb
    for x in range(p.shape[0]):
        p[x] = (a0[x] * wa + a1[x] * wb) * p[x] + (b0[x] * wa + b1[x] * wb)


@fused
def _store(lum, u, v, px):
    """R = L + u, G = L - u - v, B = L + v, rounded into a channels-last uint8 row."""
    zero, one, s = np.float32(0), np.float32(1), np.float32(255)
    for x in range(lum.shape[0]):
        px[3 * x] = np.uint8(np.rint(min(max(lum[x] + u[x], zero), one) * s))
        px[3 * x + 1] = np.uint8(np.rint(min(max(lum[x] - u[x] - v[x], zero), one) * s))
        px[3 * x + 2] = np.uint8(np.rint(min(max(lum[x] + v[x], zero), one) * s))


_local = threading.local()


def _scratch(n: int, hc: int, wc: int) -> np.ndarray:
    """One float32 buffer kept per thread for the last size asked, holding the cell sums, the
    coefficients and the work planes of `coefficients`: a video or a batch of one size reuses
    it instead of page-faulting megabytes afresh on every call (~0.5 ms at 1200x900)."""
    shape = (n * (PLANES + 6) + scratch_size(n), hc, wc)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape != shape:
        buf = _local.buf = np.empty(shape, np.float32)
    return buf


def denoise_numba(img: np.ndarray, out: np.ndarray, r_low: np.ndarray, strength: float,
                  cfg: DenoiseConfig, steps: int, run) -> None:
    """model/denoise.py's `denoise` on channels-last (N, H, 3 W) uint8 arrays, `out` rewritten
    in place; `run(kernel, *args)` launches a parallel kernel (NumbaFast._run: one at a time)."""
    n, H, WC = img.shape
    W = WC // 3
    s = cfg.cell
    hc, wc = -(-H // s), -(-W // s)
    buf = _scratch(n, hc, wc)
    sums = buf[:n * PLANES].reshape(n, PLANES, hc, wc)
    coef = buf[n * PLANES:n * (PLANES + 6)].reshape(n, 6, hc, wc)
    noise = np.empty((n, hc, -(-W // NOISE_BLOCK)), np.float32)
    run(cell_stats, img, out, s, sums, noise)
    rows = len(noise_rows(H, s))
    sigma = np.zeros(n, np.float32)
    if rows and W > 2:  # as denoise._block_quantile
        counts = block_counts(W)
        means = (noise[:, :rows] * np.float32(IMMERKAER) / np.maximum(counts, 1))[..., counts > 0]
        sigma = np.quantile(means.reshape(n, -1), cfg.noise_quantile, axis=1)
    sigma = np.minimum(sigma, cfg.max_sigma).astype(np.float32)
    rows_in = (np.minimum(s, H - np.arange(hc) * s) + 1) // 2  # even rows of each cell
    count = np.outer(rows_in, np.minimum(s, W - np.arange(wc) * s)).astype(np.float32)
    h, w = r_low.shape[-2:]
    run(coefficients, sums, count, sigma, r_low, *centre_taps(H, h, s), *centre_taps(W, w, s),
        np.float32(cfg.k_luma * strength), np.float32(cfg.k_chroma * strength),
        cfg.radius_luma, cfg.radius_chroma, steps, coef, buf[n * (PLANES + 6):])
    run(apply, out, coef, s, *cell_taps(H, s), *cell_taps(W, s))
