"""The Triton kernels of the triton backend (model/backends/triton_fused.py): factor upsampling,
the RIE steps and rounding to uint8 in one pass over the image.

Why a kernel: in torch ops the full-size part is ~35 passes over a float32 copy of the image
(upsample, 8 x 4 in-place steps, clamp, scale, round, cast), ~1 GB of memory traffic per
1200x900 image; fused it reads the uint8 image once and writes it once (6.5 MB), and the
factor map (~90 kB at EFE's resolution) stays in L2.

Without triton installed this module still imports and `triton` is None. On a machine without
a GPU the same kernel runs in Triton's interpreter (`TRITON_INTERPRET=1` set before this
module is imported), which is how tests/test_triton.py checks it on CPU.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # the triton backend then reports itself unavailable
    triton = tl = None

BLOCK = 1024  # values per program: a few row segments per 1200-pixel row

# Every size and stride is a runtime argument: Triton otherwise compiles a new variant for each
# combination of "divisible by 16" / "equal to 1" among them, i.e. at run time for new sizes.
_RUNTIME_INTS = [
    "H",
    "W",
    "blocks",
    "s_in_n",
    "s_in_y",
    "s_in_c",
    "s_out_n",
    "s_out_y",
    "s_out_c",
    "s_r_n",
    "s_r_c",
    "s_r_y",
]


if triton is not None:

    @triton.jit(do_not_specialize=_RUNTIME_INTS)
    def rie_uint8(
        img,
        out,
        r,
        y0,
        y1,
        ly,
        x0,
        x1,
        lx,
        H,
        W,
        blocks,
        s_in_n,
        s_in_y,
        s_in_c,
        s_out_n,
        s_out_y,
        s_out_c,
        s_r_n,
        s_r_c,
        s_r_y,
        STEPS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """out = round(255 * RIE(img / 255, upsample(r))) for one segment of one image row.

        Channels-last (N, H, W, 3): a program covers BLOCK consecutive values of row (n, y), i.e.
        pixels and channels interleaved, so loads and stores are contiguous. Planar (N, 3, H, W):
        BLOCK consecutive pixels of row (n, c, y). Factor map r: (n_r, 3, h, w), contiguous in w;
        s_r_n = 0 broadcasts one map over the batch. y0/y1/ly and x0/x1/lx: the bilinear
        (align_corners=True) source rows and columns with their weights, as `resample.taps`."""
        pid = tl.program_id(0).to(tl.int64)
        row, seg = pid // blocks, pid % blocks
        j = seg * BLOCK + tl.arange(0, BLOCK)
        if CHANNELS_LAST:
            n, y = row // H, row % H
            mask = j < W * 3
            x, c = j // 3, j % 3
            src = img + n * s_in_n + y * s_in_y + j
            dst = out + n * s_out_n + y * s_out_y + j
        else:
            nc, y = row // H, row % H
            n, c = nc // 3, nc % 3
            mask = j < W
            x = j
            src = img + n * s_in_n + c * s_in_c + y * s_in_y + j
            dst = out + n * s_out_n + c * s_out_c + y * s_out_y + j
        # the factor at (y, x): bilinear from the 4 neighbours at EFE's resolution, rows first as
        # PyTorch's kernel computes it
        ra, rb, wb = tl.load(y0 + y), tl.load(y1 + y), tl.load(ly + y)
        xa = tl.load(x0 + x, mask=mask, other=0)
        xb = tl.load(x1 + x, mask=mask, other=0)
        wx = tl.load(lx + x, mask=mask, other=0.0)
        plane = r + n * s_r_n + c * s_r_c
        top = (
            tl.load(plane + ra * s_r_y + xa, mask=mask, other=0.0) * (1 - wx)
            + tl.load(plane + ra * s_r_y + xb, mask=mask, other=0.0) * wx
        )
        bot = (
            tl.load(plane + rb * s_r_y + xa, mask=mask, other=0.0) * (1 - wx)
            + tl.load(plane + rb * s_r_y + xb, mask=mask, other=0.0) * wx
        )
        f = top * (1 - wb) + bot * wb
        v = tl.load(src, mask=mask, other=0).to(tl.float32) / 255.0
        for _ in tl.static_range(STEPS):  # Eq. 1: x_t = x_{t-1} + x_r * (x_{t-1}^2 - x_{t-1})
            v = v + f * (v * v - v)
        v = tl.minimum(tl.maximum(v, 0.0), 1.0) * 255.0
        # round half up instead of torch's half to even: differs only on exact .5, within 1 level
        tl.store(dst, (v + 0.5).to(tl.uint8), mask=mask)
else:
    rie_uint8 = None


if triton is not None:

    @triton.jit
    def _cell_value(plane, ca, cb, wb, xa, xb, wx, wc, mask):
        """One coefficient map (hc, wc) at the pixels: bilinear from the cell centres, rows
        first as `denoise._upsample` computes it."""
        va = (
            tl.load(plane + ca * wc + xa, mask=mask, other=0.0) * (1 - wb)
            + tl.load(plane + cb * wc + xa, mask=mask, other=0.0) * wb
        )
        vb = (
            tl.load(plane + ca * wc + xb, mask=mask, other=0.0) * (1 - wb)
            + tl.load(plane + cb * wc + xb, mask=mask, other=0.0) * wb
        )
        return va * (1 - wx) + vb * wx

    @triton.jit(do_not_specialize=["H", "W", "blocks", "hc", "wc", "s_n", "s_y", "s_x", "s_c"])
    def denoise_apply(
        img,
        out,
        coef,
        y0,
        y1,
        ly,
        x0,
        x1,
        lx,
        H,
        W,
        blocks,
        hc,
        wc,
        s_n,
        s_y,
        s_x,
        s_c,
        BLOCK: tl.constexpr,
    ):
        """The denoising stage's last pass (model/denoise.py, `apply_coefficients`) for BLOCK
        pixels of one image row: L, R - L, B - L of the pixel, q = A p + B with (A, B) from the
        cell grid coef (N, 6, hc, wc), contiguous (taps y*, x*: `denoise.cell_taps`), back to
        RGB. img and out share strides (s_n, s_y, s_x, s_c): channels-last or planar alike."""
        pid = tl.program_id(0).to(tl.int64)
        row, seg = pid // blocks, pid % blocks
        n, y = row // H, row % H
        x = seg * BLOCK + tl.arange(0, BLOCK)
        mask = x < W
        at = n * s_n + y * s_y + x * s_x
        r = tl.load(img + at, mask=mask, other=0).to(tl.float32) / 255.0
        g = tl.load(img + at + s_c, mask=mask, other=0).to(tl.float32) / 255.0
        b = tl.load(img + at + 2 * s_c, mask=mask, other=0).to(tl.float32) / 255.0
        lum = (r + g + b) / 3.0
        ca, cb, wb = tl.load(y0 + y), tl.load(y1 + y), tl.load(ly + y)
        xa = tl.load(x0 + x, mask=mask, other=0)
        xb = tl.load(x1 + x, mask=mask, other=0)
        wx = tl.load(lx + x, mask=mask, other=0.0)
        size = hc * wc
        plane = coef + n * 6 * size
        q_l = _cell_value(plane, ca, cb, wb, xa, xb, wx, wc, mask) * lum + _cell_value(
            plane + size, ca, cb, wb, xa, xb, wx, wc, mask
        )
        q_u = _cell_value(plane + 2 * size, ca, cb, wb, xa, xb, wx, wc, mask) * (
            r - lum
        ) + _cell_value(plane + 3 * size, ca, cb, wb, xa, xb, wx, wc, mask)
        q_v = _cell_value(plane + 4 * size, ca, cb, wb, xa, xb, wx, wc, mask) * (
            b - lum
        ) + _cell_value(plane + 5 * size, ca, cb, wb, xa, xb, wx, wc, mask)
        # round half up (torch: half to even): differs only on exact .5, within 1 level
        r = tl.minimum(tl.maximum(q_l + q_u, 0.0), 1.0) * 255.0 + 0.5
        g = tl.minimum(tl.maximum(q_l - q_u - q_v, 0.0), 1.0) * 255.0 + 0.5
        b = tl.minimum(tl.maximum(q_l + q_v, 0.0), 1.0) * 255.0 + 0.5
        tl.store(out + at, r.to(tl.uint8), mask=mask)
        tl.store(out + at + s_c, g.to(tl.uint8), mask=mask)
        tl.store(out + at + 2 * s_c, b.to(tl.uint8), mask=mask)
else:
    denoise_apply = None
