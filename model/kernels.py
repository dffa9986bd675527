"""The numba kernels of the numba backend (model/backends/numba_fused.py): EFE from uint8 in one
compiled loop nest per block (the full-size RIE pass is in model/kernels_rie.py). Compiled on
first use, cached on disk, releasing the GIL.

Importing this module imports numba and configures it (threading layer, CPU features): only
the numba backend and the shared CPU stages (exposure, video) import it, lazily, so that
`import model` does not. Without numba installed it still imports (the decorators become
no-ops) and `numba` is None.
"""

import os

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # the numba backend then reports itself unavailable
    numba = None
    prange = range

    def njit(*args, **kwargs):
        return lambda f: f


if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's own thread pool, not OpenMP: OpenMP's waiting threads spin and starve the busy
    # one on a loaded machine (docs/performance.md, "What the fast path does"). Not safe for
    # concurrent launches: the numba backend serialises them with one lock.
    numba.config.THREADING_LAYER = "workqueue"

if numba is not None and "NUMBA_CPU_FEATURES" not in os.environ:
    import llvmlite.binding

    _host = llvmlite.binding.get_host_cpu_features()
    if _host.get("avx512f"):
        # long vectorisable loops gain from 512-bit vectors, which LLVM's tuning avoids
        # (docs/performance.md, "512-bit vectors on AVX-512 CPUs"). Set before anything compiles.
        numba.config.CPU_FEATURES = _host.flatten() + ",-prefer-256-bit"


def _compile(parallel: bool, fastmath=False, error_model="python"):
    """numba-compiled, releasing the GIL, cached on disk (next to this file, or in
    NUMBA_CACHE_DIR); with nowhere writable to cache, compiled at every start instead.
    error_model="numpy": a division does not check for zero (the check keeps the loop scalar)."""

    def wrap(f):
        options = dict(parallel=parallel, fastmath=fastmath, error_model=error_model, nogil=True)
        try:
            return njit(cache=True, **options)(f)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return njit(**options)(f)

    return wrap


kernel, serial = _compile(parallel=True), _compile(parallel=False)
# multiply-adds may fuse (one rounding instead of two): faster (docs/performance.md, "What the
# fast path does"), x_r still within 1e-5 of the eager reference (tests/test_fast.py)
fused = _compile(parallel=False, fastmath={"contract"})

CHUNK = 512  # EFE pixels per pass of _block: its depthwise results (<= 64 x 2 KB) stay in L2
HALO = 7  # EFE has 7 blocks of 3x3 convolutions: each reaches one row further
MIN_BAND_ROWS = 4 * HALO  # below this a single image's EFE is too small to split in two
# Trained EFEs leave middle blocks nearly dead: weight decay takes their weights to 1e-9..1e-30
# in ours (the published SGZ checkpoint's e_conv3-5 hold denormals, ~2e-40), so activations
# reach ~1e-24 and products of the two fall below float32's normal range, where x86 computes
# far slower. Weights (the numba backend's `fold`) and activations below
# TINY are set to 0: every product of two values at or above it stays normal, and what is
# dropped is ~1e-17 of a factor map that tanh bounds to [-1, 1].
TINY = np.float32(1e-19)


@serial
def _downscale(img, y0, y1, ly, x0, x1, lx, out):
    """One image: out[:, 1:-1, 1:-1] = bilinear(img / 255) at the taps; reads 4 pixels per
    output pixel, never the rest of the image."""
    one, s = np.float32(1), np.float32(255)
    for c in range(img.shape[0]):
        for y in range(ly.shape[0]):
            a, b = img[c, y0[y]], img[c, y1[y]]
            for x in range(lx.shape[0]):
                p, q = lx[x], one - lx[x]
                top = (np.float32(a[x0[x]]) / s) * q + (np.float32(a[x1[x]]) / s) * p
                bot = (np.float32(b[x0[x]]) / s) * q + (np.float32(b[x1[x]]) / s) * p
                out[c, y + 1, x + 1] = top * (one - ly[y]) + bot * ly[y]


@fused
def _block(a, b, dw, pw, bias, out, tanh, r0, r1):
    """One EFE block of one image on zero-bordered maps (C, h+2, w+2), rows r0 to r1 - 1 of
    the h: the input is the channel concat [a, b]; out = act(pw @ depthwise3x3(input) + bias),
    act = tanh or ReLU. Rows outside [r0, r1) are left as they were.

    The maps are walked as flat arrays, CHUNK pixels at a time, so every inner loop is long and
    contiguous (row by row, w ~ 100 left a third of each vectorised loop to its scalar tail).
    The depthwise results of a chunk stay in cache for the pointwise sums (_pointwise4). The
    border columns inside the span get junk and are zeroed after."""
    ca, hp, wp = a.shape
    cb, cout = b.shape[0], pw.shape[0]
    cin = ca + cb
    fa, fb, fo = a.reshape(ca, hp * wp), b.reshape(cb, hp * wp), out.reshape(cout, hp * wp)
    start, stop = (r0 + 1) * wp + 1, (r1 + 1) * wp - 1  # first to last pixel: neighbours in range
    d = np.empty((cin, CHUNK), np.float32)
    acc = np.empty((4, CHUNK), np.float32)
    for c0 in range(start, stop, CHUNK):
        n = min(CHUNK, stop - c0)
        for i in range(cin):
            src, k, di = (fa[i] if i < ca else fb[i - ca]), dw[i], d[i]
            r0, r1, r2 = src[c0 - wp - 1 :], src[c0 - 1 :], src[c0 + wp - 1 :]
            for j in range(n):
                di[j] = (
                    k[0, 0] * r0[j]
                    + k[0, 1] * r0[j + 1]
                    + k[0, 2] * r0[j + 2]
                    + k[1, 0] * r1[j]
                    + k[1, 1] * r1[j + 1]
                    + k[1, 2] * r1[j + 2]
                    + k[2, 0] * r2[j]
                    + k[2, 1] * r2[j + 1]
                    + k[2, 2] * r2[j + 2]
                )
        for o in range(0, cout, 4):  # a last group of fewer than 4 repeats its last row
            a, b, c, e = o, min(o + 1, cout - 1), min(o + 2, cout - 1), min(o + 3, cout - 1)
            _pointwise4(
                pw[a],
                pw[b],
                pw[c],
                pw[e],
                d,
                bias[a],
                bias[b],
                bias[c],
                bias[e],
                acc[0],
                acc[1],
                acc[2],
                acc[3],
                n,
            )
            for k in range(min(4, cout - o)):
                _activate(acc[k], fo[o + k, c0:], n, tanh)
    _zero_border(out)


@serial
def _activate(acc, dst, n, tanh):
    if tanh:
        _tanh(acc, dst, n)
    else:  # ReLU, with values under TINY flushed to 0 (see TINY)
        zero, tiny = np.float32(0), TINY
        for j in range(n):
            v = acc[j]
            dst[j] = v if v >= tiny else zero


# tanh(x) ~ x P(s) / Q(s), s = (x / TANH_CLIP)^2, |x| clipped to TANH_CLIP: a rational
# least-squares fit (Lawson-weighted toward minimax) to tanh on [0, 9]; max error 2e-8, 4e-7
# in float32 (tests/test_fast.py), as against libm's scalar tanhf, which does not vectorise
TANH_CLIP = np.float32(9)
TANH_P = tuple(np.float32(c) for c in (0.999999906, 10.8323268, 22.8758152, 10.8800341, 0.56758905))
TANH_Q = tuple(np.float32(c) for c in (1.0, 37.8322973, 169.550566, 173.859467, 33.1595593))


@_compile(parallel=False, fastmath={"contract"}, error_model="numpy")  # q >= 1: no zero check
def _tanh(src, dst, n):
    """dst[:n] = tanh(src[:n]) within 4e-7: a vectorised loop (see TANH_P)."""
    clip, one = TANH_CLIP, np.float32(1)
    inv = one / (clip * clip)
    p0, p1, p2, p3, p4 = TANH_P
    q0, q1, q2, q3, q4 = TANH_Q
    for j in range(n):
        x = min(max(src[j], -clip), clip)
        s = x * x * inv
        p = (((p4 * s + p3) * s + p2) * s + p1) * s + p0
        q = (((q4 * s + q3) * s + q2) * s + q1) * s + q0
        dst[j] = min(max(x * p / q, -one), one)


@fused
def _pointwise4(p, q, r, t, d, bp, bq, br, bt, ap, aq, ar, at, n):
    """ap[:n] = bp + sum_i p[i] * d[i, :n], and the same for q, r, t: four output channels at
    once, so each load of d feeds four multiply-adds. Summed in order of i, 4 channels per pass
    over the accumulators: their 16 weights stay in registers (with 8 channels per pass, 32
    weights did not fit in AVX2's 16 and were reloaded from the stack for every vector:
    docs/performance.md, "What the fast path does")."""
    cin = p.shape[0]
    for j in range(n):
        ap[j], aq[j], ar[j], at[j] = bp, bq, br, bt
    i = 0
    while i + 4 <= cin:
        d0, d1, d2, d3 = d[i], d[i + 1], d[i + 2], d[i + 3]
        p0, p1, p2, p3 = p[i : i + 4]
        q0, q1, q2, q3 = q[i : i + 4]
        r0, r1, r2, r3 = r[i : i + 4]
        t0, t1, t2, t3 = t[i : i + 4]
        for j in range(n):
            e0, e1, e2, e3 = d0[j], d1[j], d2[j], d3[j]
            ap[j] = ap[j] + p0 * e0 + p1 * e1 + p2 * e2 + p3 * e3
            aq[j] = aq[j] + q0 * e0 + q1 * e1 + q2 * e2 + q3 * e3
            ar[j] = ar[j] + r0 * e0 + r1 * e1 + r2 * e2 + r3 * e3
            at[j] = at[j] + t0 * e0 + t1 * e1 + t2 * e2 + t3 * e3
        i += 4
    tail = i  # the channels left over from the blocks of 4
    for i in range(tail, cin):
        pi, qi, ri, ti, di = p[i], q[i], r[i], t[i], d[i]
        for j in range(n):
            ap[j] += pi * di[j]
            aq[j] += qi * di[j]
            ar[j] += ri * di[j]
            at[j] += ti * di[j]


@serial
def _zero_border(maps):
    """Zero the one-pixel frame of (C, h+2, w+2) maps: the next convolution's padding."""
    zero = np.float32(0)
    c, hp, wp = maps.shape
    for o in range(c):
        maps[o, 0, :] = zero
        maps[o, hp - 1, :] = zero
        for y in range(1, hp - 1):
            maps[o, y, 0] = zero
            maps[o, y, wp - 1] = zero


@serial
def efe_one(img, y0, y1, ly, x0, x1, lx, dws, pws, biases, out, lo, hi):
    """EFE of one image, uint8 in, x_r into out (3, h+2, w+2), exact on rows lo to hi - 1.
    Block k (1 to 7) computes only the rows within HALO - k of those: the rows the blocks after
    it read (a band of a split image skips 9% of its work so, a whole image none). Its maps are
    allocated here, per image: a batch's worth in one array would exceed malloc's reuse
    threshold and page-fault afresh on every call. maps holds x1..x6 (the paper's block
    outputs) in slots 0..5; zero borders are the convolutions' padding."""
    h, hp, wp = out.shape[1] - 2, out.shape[1], out.shape[2]
    x = np.zeros((3, hp, wp), np.float32)
    maps = np.empty((6, dws[1].shape[0], hp, wp), np.float32)  # _block zeroes their borders
    none = np.zeros((0, hp, wp), np.float32)
    r0 = np.empty(HALO, np.int64)
    r1 = np.empty(HALO, np.int64)
    for k in range(HALO):  # block k + 1 reaches HALO - 1 - k rows beyond the exact ones
        r0[k], r1[k] = max(0, lo - (HALO - 1 - k)), min(h, hi + (HALO - 1 - k))
    _downscale(img, y0, y1, ly, x0, x1, lx, x)
    _block(x, none, dws[0], pws[0], biases[0], maps[0], False, r0[0], r1[0])
    _block(maps[0], none, dws[1], pws[1], biases[1], maps[1], False, r0[1], r1[1])
    _block(maps[1], none, dws[2], pws[2], biases[2], maps[2], False, r0[2], r1[2])
    _block(maps[2], none, dws[3], pws[3], biases[3], maps[3], False, r0[3], r1[3])
    _block(maps[2], maps[3], dws[4], pws[4], biases[4], maps[4], False, r0[4], r1[4])  # [x3, x4]
    _block(maps[1], maps[4], dws[5], pws[5], biases[5], maps[5], False, r0[5], r1[5])  # [x2, x5]
    _block(maps[0], maps[5], dws[6], pws[6], biases[6], out, True, r0[6], r1[6])  # [x1, x6]


@kernel
def efe_items(img, which, y0, y1, ly, x0, x1, lx, dws, pws, biases, out, lo, hi):
    """EFE of several items in parallel, one per thread: a single fork/join for the whole
    network. Item k is image which[k] at EFE rows given by its own row taps y0[k], y1[k], ly[k]
    (whole images for a batch, overlapping bands of one image; see NumbaBackend.factor_lowres),
    exact on its rows lo[k] to hi[k] - 1."""
    for k in prange(which.shape[0]):
        efe_one(
            img[which[k]], y0[k], y1[k], ly[k], x0, x1, lx, dws, pws, biases, out[k], lo[k], hi[k]
        )
