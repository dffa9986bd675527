"""The numba kernels of the denoising stage (model/denoise.py is the reference they follow).

Three launches: `rie_stats` is RIE's fused pass (kernels_rie.rie_uint8) that, on each band of rows
just written, sums each cell's luma, chroma, their squares and the input's luma, plus
Immerkaer's sums on one input row per cell row; `coefficients` (model/kernels_guided.py) runs
the guided filter at cell resolution (1/16 of the pixels); `apply` upsamples the filter's
(A, B) and rewrites the output in place, q = A p + B on L, R - L, B - L. Images are
channels-last rows, (N, H, 3 W) uint8.
"""

import threading
from functools import lru_cache

import numpy as np

from .denoise import (
    IMMERKAER,
    NOISE_BLOCK,
    DenoiseConfig,
    block_counts,
    cell_taps,
    centre_taps,
    noise_rows,
)
from .kernels import prange
from .kernels_guided import coefficients, scratch_size, window_reciprocals
from .kernels_rie import factor_rows, rie_rows
from .kernels_rows import _cell_reduce, _fill, _luma, _luv, _sum, _to_float, fused, kernel, serial
from .resample import taps

STATS_BAND = 8  # cell rows per job of `cell_stats`
APPLY_ROWS = 32  # image rows per job of `apply`: each upsamples ~APPLY_ROWS / cell + 2 cell rows
PLANES = 7  # cell sums: L, R-L, B-L, their squares, the input's luma


@kernel
def rie_stats(img, r_low, y0, y1, ly, x0, x1, lx, steps, out, cell, sums, noise):
    """RIE's fused pass (kernels_rie.rie_uint8: out = its uint8 output of img with the factor maps
    r_low at the taps y*, x*) and, on each band of cell rows just written, while the rows are
    in cache, the statistics: sums (N, PLANES, hc, wc) float32, noise (N, hc, blocks) float32:
    per cell row, the sums
    of |L * N| over each block of NOISE_BLOCK columns of its row at offset 1
    (model/denoise.py, `noise_sigma`). img, out: (N, H, 3 W)
    uint8, channels-last rows; cell even, >= 4. Each row's values are summed per pixel into
    buffers (one loop over the interleaved pixels: it vectorises), then per cell."""
    n_img, hc = img.shape[0], sums.shape[2]
    rows = factor_rows(r_low, x0, x1, lx, img.shape[2])
    bands = (hc + STATS_BAND - 1) // STATS_BAND
    for job in prange(n_img * bands):  # the body is its own function: kept out of numba's
        n, band = job // bands, job % bands  # parfor passes
        rie_rows(
            img,
            rows,
            y0,
            y1,
            ly,
            steps,
            out,
            n,
            band * STATS_BAND * cell,
            min(img.shape[1], (band + 1) * STATS_BAND * cell),
        )
        _stats_job(img, out, cell, sums, noise, n, band)


@serial
def _stats_job(img, out, cell, sums, noise, n, band):
    H, WC = img.shape[1:]
    W = WC // 3
    acc = np.empty((PLANES, W), np.float32)
    f = np.empty(WC, np.float32)
    planes = np.empty((3, W), np.float32)  # planes[0]: Immerkaer's |L * N| along the row
    lum = np.empty((3, W), np.float32)  # the input's luma at rows 0, 2 and 1 of the cell
    for i in range(band * STATS_BAND, min(sums.shape[2], (band + 1) * STATS_BAND)):
        _fill(acc.reshape(-1), np.float32(0))
        for y in range(i * cell, min(H, (i + 1) * cell), 2):  # even rows (denoise._cell_sums)
            k = min((y - i * cell) // 2, 2)  # rows 0 and 2 are kept; lum[2] is scratch here
            _stats_row(out[n, y], img[n, y], acc, lum[k])
        for p in range(PLANES):
            _cell_reduce(acc[p], cell, sums[n, p, i])
        y = i * cell + 1  # Immerkaer's row, between the two even rows kept in lum
        _fill(noise[n, i], np.float32(0))
        if y < H - 1 and W > 2:
            _to_float(img[n, y], f)
            _luma(f, lum[2])
            _immerkaer(lum[0], lum[2], lum[1], planes[0])
            for b in range(noise.shape[2]):
                noise[n, i, b] = _sum(planes[0, b * NOISE_BLOCK : (b + 1) * NOISE_BLOCK])


@fused
def _stats_row(px, src, acc, lum):
    """acc[0:3] += L, R - L, B - L of the output row px, acc[3:6] += their squares, acc[6] and
    lum = the input row src's luma: one loop over the interleaved pixels (it vectorises)."""
    for x in range(lum.shape[0]):
        L, u, v = _luv(px, x)
        acc[0, x] += L
        acc[1, x] += u
        acc[2, x] += v
        acc[3, x] += L * L
        acc[4, x] += u * u
        acc[5, x] += v * v
        lum[x] = _luv(src, x)[0]
        acc[6, x] += lum[x]


@fused
def _immerkaer(up, mid, down, dst):
    """dst[x] = |L * N| at x = 1 .. W - 2, 0 at both ends."""
    W = mid.shape[0]
    dst[0], dst[W - 1] = np.float32(0), np.float32(0)
    for x in range(1, W - 1):
        c = (
            up[x - 1]
            - 2 * up[x]
            + up[x + 1]
            - 2 * (mid[x - 1] - 2 * mid[x] + mid[x + 1])
            + down[x - 1]
            - 2 * down[x]
            + down[x + 1]
        )
        dst[x] = abs(c)


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
    ya, yb = blk * APPLY_ROWS, min(out.shape[1], (blk + 1) * APPLY_ROWS)
    rows = np.empty((2, 6, out.shape[2] // 3), np.float32)  # cell rows i in slot i % 2, along x
    held = np.full(2, -1, np.int64)
    for y in range(ya, yb):
        for i in (y0[y], y1[y]):
            if held[i % 2] != i:
                held[i % 2] = i
                for p in range(6):
                    _upsample_row(coef[n, p, i], x0, x1, lx, rows[i % 2, p])
        _apply_row(out[n, y], rows[y0[y] % 2], rows[y1[y] % 2], ly[y])


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
def _apply_row(px, ra, rb, wb):
    """px (3 W uint8, channels-last) rewritten: q = A p + B on L, R - L, B - L, (A, B) between
    the coefficient rows ra and rb (6, W) at weight wb, then R = L + u, G = L - u - v,
    B = L + v rounded. One loop over the interleaved pixels: it vectorises, and a loop per
    plane through float rows took 1.5x as long (docs/performance.md, "The denoising stage")."""
    zero, one, s = np.float32(0), np.float32(1), np.float32(255)
    wa = one - wb
    for x in range(ra.shape[1]):
        L, u, v = _luv(px, x)
        L = (ra[0, x] * wa + rb[0, x] * wb) * L + (ra[1, x] * wa + rb[1, x] * wb)
        u = (ra[2, x] * wa + rb[2, x] * wb) * u + (ra[3, x] * wa + rb[3, x] * wb)
        v = (ra[4, x] * wa + rb[4, x] * wb) * v + (ra[5, x] * wa + rb[5, x] * wb)
        px[3 * x] = np.uint8(np.rint(min(max(L + u, zero), one) * s))
        px[3 * x + 1] = np.uint8(np.rint(min(max(L - u - v, zero), one) * s))
        px[3 * x + 2] = np.uint8(np.rint(min(max(L + v, zero), one) * s))


_local = threading.local()


def _scratch(n: int, hc: int, wc: int) -> np.ndarray:
    """One float32 buffer kept per thread for the last size asked, holding the cell sums, the
    coefficients and the work planes of `coefficients`: a video or a batch of one size reuses
    it instead of page-faulting megabytes afresh on every call (docs/performance.md, "The
    denoising stage")."""
    shape = (n * (PLANES + 6) + scratch_size(n), hc, wc)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape != shape:
        buf = _local.buf = np.empty(shape, np.float32)
    return buf


@lru_cache(maxsize=256)
def _taps(n_in: int, n_out: int):
    return taps(n_in, n_out, True)


@lru_cache(maxsize=256)
def _block_scale(W: int):
    """IMMERKAER / the interior pixels of each noise block, and which blocks have any."""
    counts = block_counts(W)
    return np.float32(IMMERKAER) / np.maximum(counts, 1), counts > 0


def _quantile(values: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) method, without its per-call overhead
    (docs/performance.md, "The denoising stage")."""
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    part = np.partition(values, (lo, hi))
    return float(part[lo] + (part[hi] - part[lo]) * (pos - lo))


@lru_cache(maxsize=64)
def _geometry(H: int, W: int, cell: int, radius_luma: int, radius_chroma: int):
    """Per image size: the pixels of each cell that the statistics read (its even rows), and
    `window_reciprocals` of them (read-only: shared by every call and thread)."""
    hc, wc = -(-H // cell), -(-W // cell)
    rows_in = (np.minimum(cell, H - np.arange(hc) * cell) + 1) // 2
    count = np.outer(rows_in, np.minimum(cell, W - np.arange(wc) * cell)).astype(np.float32)
    windows = window_reciprocals(count, radius_luma, radius_chroma)
    count.flags.writeable = windows.flags.writeable = False
    return count, windows


def denoise_numba(
    img: np.ndarray,
    out: np.ndarray,
    r_low: np.ndarray,
    strength: float,
    cfg: DenoiseConfig,
    steps: int,
    run,
) -> None:
    """RIE (as kernels_rie.rie_uint8) and model/denoise.py's `denoise` on channels-last (N, H, 3 W)
    uint8 arrays into `out`; r_low (n_r, 3, h, w) float32; `run(kernel, *args)` launches a
    parallel kernel (the numba backend's `launch`: one at a time)."""
    n, H, WC = img.shape
    W = WC // 3
    s = cfg.cell
    hc, wc = -(-H // s), -(-W // s)
    buf = _scratch(n, hc, wc)
    sums = buf[: n * PLANES].reshape(n, PLANES, hc, wc)
    coef = buf[n * PLANES : n * (PLANES + 6)].reshape(n, 6, hc, wc)
    noise = np.empty((n, hc, -(-W // NOISE_BLOCK)), np.float32)
    h, w = r_low.shape[-2:]
    run(rie_stats, img, r_low, *_taps(h, H), *_taps(w, W), steps, out, s, sums, noise)
    rows = len(noise_rows(H, s))
    sigma = np.zeros(n, np.float32)
    if rows and W > 2:  # as denoise._block_quantile
        scale, valid = _block_scale(W)
        means = (noise[:, :rows] * scale)[..., valid].reshape(n, -1)
        sigma = np.array([_quantile(m, cfg.noise_quantile) for m in means])
    sigma = np.minimum(sigma, cfg.max_sigma).astype(np.float32)
    count, windows = _geometry(H, W, s, cfg.radius_luma, cfg.radius_chroma)
    run(
        coefficients,
        sums,
        count,
        windows,
        sigma,
        r_low,
        *centre_taps(H, h, s),
        *centre_taps(W, w, s),
        np.float32(cfg.k_luma * strength),
        np.float32(cfg.k_chroma * strength),
        cfg.radius_luma,
        cfg.radius_chroma,
        steps,
        coef,
        buf[n * (PLANES + 6) :],
    )
    run(apply, out, coef, s, *cell_taps(H, s), *cell_taps(W, s))
