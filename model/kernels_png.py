"""PNG scanline reconstruction ("unfiltering", PNG spec section 9) as a wavefront over rows.

Sub, Average and Paeth make every byte depend on the reconstructed byte `bpp` to its left, so
one row is a serial chain that no SIMD unit speeds up (libpng's loop, ~8 ms of a 1200x900 RGB
image here). But byte (y, x) depends only on (y, x-bpp), (y-1, x) and (y-1, x-bpp): if row y+1
runs one pixel behind row y, LANES rows are independent at every step. So a band of LANES rows
is copied skewed (lane k delayed by k+1 pixels) and transposed, lanes side by side, and one
vectorised loop over the lanes reconstructs a byte of every row per step. Bytes before a row's
start stay zero, which is what the filters assume there; lanes past a row's end or past the
image's last row compute values nobody reads. docs/performance.md, "Image coding".
"""

import threading

import numpy as np
from numba import njit
from numpy.lib.stride_tricks import as_strided

from .kernels import serial

LANES = 32  # rows per band: four AVX2 float32 vectors per step
GROUP = 8  # bands per pass: the skewed copies stay in L2 (~1 MB each at 1200 pixels wide)
SCRATCH_BYTES = 4 << 20  # per kept array and decoding thread: rows up to 4K RGBA (bigger: fresh)
PAETH = 4  # filter types: 0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth
_local = threading.local()


def unfilter(raw: np.ndarray, height: int, width: int, bpp: int) -> np.ndarray:
    """Inflated PNG image data, (height * (1 + width * bpp),) uint8 with a filter byte before
    each scanline -> the reconstructed (height, width * bpp) uint8 rows. ValueError on a filter
    type outside 0-4."""
    stride = width * bpp
    rows = raw.reshape(height, stride + 1)
    filters = rows[:, 0]
    if filters.max(initial=0) > PAETH:
        raise ValueError(f"PNG filter type {int(filters.max())} is not one of 0-4")
    steps, pad = stride + bpp * LANES, 2 * bpp
    skewed, out = _scratch(pad + steps, bpp)
    state = np.zeros((pad + steps, LANES + 1), np.float32)
    pixels = np.empty((height, stride), np.uint8)
    for y0 in range(0, height, GROUP * LANES):
        y1 = min(height, y0 + GROUP * LANES)
        bands = -(-(y1 - y0) // LANES)
        full, rest = divmod(y1 - y0, LANES)
        lanes = _lanes(skewed[:bands], bpp, pad)
        lanes[:full] = rows[y0 : y0 + full * LANES, 1:].reshape(full, LANES, stride)
        if rest:  # lanes past the last row: zeros (filter None), computed but never read
            skewed[full, :, rest:] = 0
            lanes[full, :rest] = rows[y0 + full * LANES : y1, 1:]
        lane_filters = np.zeros(bands * LANES, np.uint8)
        lane_filters[: y1 - y0] = filters[y0:y1]
        _reconstruct(skewed[:bands], lane_filters.reshape(bands, LANES), out, state, bpp, y0 == 0)
        done = _lanes(out[:bands], bpp, pad)
        pixels[y0 : y0 + full * LANES].reshape(full, LANES, stride)[...] = done[:full]
        if rest:
            pixels[y0 + full * LANES : y1] = done[full, :rest]
    return pixels


def _scratch(depth: int, bpp: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's skewed in and out arrays for GROUP bands of `depth` steps: reused, as
    fresh ones cost more in page faults than the reconstruction. Bytes the copies never write
    must stay zero, so one pair per row layout (depth and bpp); very wide images get their own."""
    if GROUP * depth * LANES > SCRATCH_BYTES:
        return np.zeros((GROUP, depth, LANES), np.uint8), np.empty((GROUP, depth, LANES), np.uint8)
    if getattr(_local, "layout", None) != (depth, bpp):
        _local.layout = (depth, bpp)
        _local.arrays = tuple(np.zeros((GROUP, depth, LANES), np.uint8) for _ in range(2))
    return _local.arrays


def _lanes(skewed: np.ndarray, bpp: int, pad: int) -> np.ndarray:
    """(bands, LANES, stride) view of a skewed array: [b, k, i] is byte i of band b's row k,
    held at skewed[b, pad + bpp * (k + 1) + i, k]."""
    bands, depth, lanes = skewed.shape
    stride = depth - pad - bpp * lanes
    s_band, s_step, s_lane = skewed.strides
    start = skewed[:, pad + bpp :, :]
    return as_strided(
        start, (bands, lanes, stride), (s_band, s_lane + bpp * s_step, s_step), writeable=True
    )


@serial
def _reconstruct(skewed, filters, out, state, bpp, first):
    """Band after band; `state` (float32, lane 0 = the row above the band) carries the last
    row on to the next band and the next call."""
    pad, steps = 2 * bpp, skewed.shape[1] - 2 * bpp
    shift = bpp * LANES
    weights = np.zeros((5, LANES), np.float32)  # per lane: 1 for its row's filter type
    for b in range(skewed.shape[0]):
        # lane 0: the previous band's last lane without its delay (zeros above the image)
        for t in range(pad, pad + steps - shift):
            state[t, 0] = 0 if first and b == 0 else state[t + shift, LANES]
        weights[:] = 0
        all_paeth = True
        for k in range(LANES):
            weights[filters[b, k], k] = 1
            all_paeth = all_paeth and filters[b, k] == PAETH
        if all_paeth:
            _paeth_steps(state, skewed[b], out[b], bpp, pad, steps)
        else:
            _mixed_steps(state, skewed[b], out[b], weights, bpp, pad, steps)


@serial
def _paeth_steps(state, filtered, out, bpp, pad, steps):
    """One byte of every lane per step, all Paeth (most encoders' choice for photos)."""
    for t in range(pad, pad + steps):
        now, left, left_up = state[t], state[t - bpp], state[t - 2 * bpp]
        raw, done = filtered[t], out[t]
        for k in range(LANES):
            a, b, c = left[k + 1], left[k], left_up[k]  # left, up, up-left (lane k-1: row above)
            value = np.float32(raw[k]) + _paeth(a, b, c)
            value = value - np.float32(256) if value >= np.float32(256) else value  # mod 256
            now[k + 1] = value
            done[k] = np.uint8(value)


@serial
def _mixed_steps(state, filtered, out, weights, bpp, pad, steps):
    """As _paeth_steps, each lane's predictor chosen by its row's filter type (branch-free)."""
    sub, up, average, paeth = weights[1], weights[2], weights[3], weights[4]
    for t in range(pad, pad + steps):
        now, left, left_up = state[t], state[t - bpp], state[t - 2 * bpp]
        raw, done = filtered[t], out[t]
        for k in range(LANES):
            a, b, c = left[k + 1], left[k], left_up[k]
            mean = np.floor((a + b) * np.float32(0.5))
            predicted = paeth[k] * _paeth(a, b, c) + average[k] * mean + up[k] * b + sub[k] * a
            value = np.float32(raw[k]) + predicted
            value = value - np.float32(256) if value >= np.float32(256) else value
            now[k + 1] = value
            done[k] = np.uint8(value)


@njit(inline="always", cache=True)
def _paeth(a, b, c):
    """PNG's Paeth predictor: whichever of left, up, up-left is nearest a + b - c (ties in
    that order). Exact in float32: every value is a small integer."""
    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)
    return a if (pa <= pb) & (pa <= pc) else (b if pb <= pc else c)
