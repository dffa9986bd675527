"""Exposure and denoising as exportable graph pieces: model/exposure.py and model/denoise.py
rewritten in torch ops whose ONNX export keeps the batch, height and width dynamic (no Python
value depends on the input's size; shapes come from `_hw`, loops are unrolled a fixed number of
times). model/onnx_graph.py chains them; tests/test_export.py checks the graph against
`Enhancer.enhance` with its defaults under ONNX Runtime.

- `ExposureShift`: `Enhancer.expose`. The mean output is estimated on the same samples as
  `exposure.samples` (the same nearest-pixel taps, in integer arithmetic, the same thinning
  step), and the bisection runs `exposure.ITERATIONS` unrolled iterations on [-2, 2] for all
  images at once; floor ("auto": images already bright enough keep offset 0) and max_lift as
  `Enhancer.expose` passes them. The bisection's midpoints are dyadic, exact in float32.
- `Denoise`: `denoise.denoise`. The noise estimate's quantile is a sort (ONNX TopK) with the
  same linear interpolation as `torch.quantile`, blocks without interior pixels left out as the
  reference does; the cell sums are average pools, the window sums grouped convolutions, the
  cell-centre taps computed in float64 as the reference's numpy does.
"""

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from . import exposure as exposure_ref
from .denoise import IMMERKAER, NOISE_BLOCK, TINY_VAR, DenoiseConfig
from .onnx_graph import _hw, traced_arange

BIG = 3.0e38  # sorts after every block estimate: a block left out of the quantile


def _arange(n: torch.Tensor, step=1) -> torch.Tensor:
    """0, step, .. < n as int64, n (and step) traced: Range."""
    end = cast(int, n.clamp(min=0).long())  # traced tensors, which torch's stubs leave out
    return torch.arange(0, end, step if isinstance(step, int) else cast(int, step.long()))


def _rie(x: torch.Tensor, r: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):  # Eq. 1, as rie.rie and exposure.mean_after
        x = x + r * (x * x - x)
    return x


class ExposureShift(nn.Module):
    """(images, r_low) -> r_low shifted per image so that the mean output reaches `target`
    (`exposure.apply_exposure`): images uint8 (or float in [0, 1] with `float_input`)."""

    def __init__(
        self,
        target: float,
        steps: int,
        floor: bool = False,
        max_lift: float = 2.0,
        float_input: bool = False,
    ):
        super().__init__()
        self.target, self.steps, self.floor, self.max_lift = target, steps, floor, max_lift
        self.divisor = 1.0 if float_input else 255.0

    def samples(self, images: torch.Tensor, r_low: torch.Tensor):
        """`exposure.samples` and the factor map at the same cells, both (N, 3 h' w')."""
        H, W = _hw(images)
        h, w = _hw(r_low)
        # step = max(1, ceil(sqrt(h w / MAX_SAMPLES))), in float64 as numpy does
        step = torch.ceil(torch.sqrt((h.double() * w.double()) / exposure_ref.MAX_SAMPLES))
        step = step.clamp(min=1).long()
        iy, ix = _arange(h, step), _arange(w, step)
        # min((i + 0.5) H / h, H - 1) truncated: exactly floor((2 i + 1) H / (2 h)), in int64
        ys = torch.minimum(((2 * iy + 1) * H.long()) // (2 * h.long()), H.long() - 1)
        xs = torch.minimum(((2 * ix + 1) * W.long()) // (2 * w.long()), W.long() - 1)
        n = images.shape[0]
        x = images.index_select(2, ys).index_select(3, xs).float() / self.divisor
        r = r_low.index_select(2, iy).index_select(3, ix)
        return x.reshape(n, -1), r.reshape(n, -1)

    def mean_after(self, x: torch.Tensor, r: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return _rie(x, (r + offset[:, None]).clamp(-1, 1), self.steps).mean(1)

    def forward(self, images: torch.Tensor, r_low: torch.Tensor) -> torch.Tensor:
        x, r = self.samples(images, r_low)
        zero = x[:, 0] * 0  # (N,): the batch stays dynamic
        lo, hi = zero - 2, zero + 2  # brighter at lo
        for _ in range(exposure_ref.ITERATIONS):
            mid = (lo + hi) / 2
            brighter = self.mean_after(x, r, mid) > self.target
            lo, hi = torch.where(brighter, mid, lo), torch.where(brighter, hi, mid)
        offset = (lo + hi) / 2
        if self.floor:
            offset = torch.where(self.mean_after(x, r, zero) >= self.target, zero, offset)
        offset = offset.clamp(min=-self.max_lift)
        return (r_low + offset[:, None, None, None]).clamp(-1, 1)


def _cell_sums(p: torch.Tensor, cell: int) -> torch.Tensor:
    """`denoise._cell_sums`: sums over each cell's even rows, (N, C, ceil(H/cell), ceil(W/cell)).
    A static pad of cell - 1 zeros, then a pool; the rows beyond ceil(H / cell) dropped."""
    H, _ = _hw(p)
    p = F.pad(p, (0, cell - 1, 0, cell - 1))[..., ::2, :]
    s = F.avg_pool2d(p, (cell // 2, cell)) * float(cell // 2 * cell)  # exact: a power of 2
    return s.index_select(2, _arange(torch.ceil(H / cell)))


def _box(p: torch.Tensor, radius: int) -> torch.Tensor:
    """`denoise._box` on one plane (N, 1, h, w): a static kernel, as the exporter needs."""
    k = torch.ones(1, 1, 2 * radius + 1, 2 * radius + 1)
    return F.conv2d(p, k, padding=radius)


def _cell_taps(n_full: torch.Tensor, cell: int):
    """`denoise.cell_taps`: cell centres -> pixels (dyadic: exact in float32)."""
    n_cells = torch.ceil(n_full / cell)
    src = (traced_arange(n_full.long(), torch.float32) + 0.5) / cell - 0.5
    src = torch.minimum(src.clamp(min=0), n_cells - 1)
    i0 = src.floor()
    i1 = torch.minimum(i0 + 1, n_cells - 1)
    return i0.long(), i1.long(), src - i0


def _centre_taps(n_full: torch.Tensor, n_low: torch.Tensor, cell: int):
    """`denoise.centre_taps`, in float64 as its numpy, the weight then float32."""
    n_full, n_low = n_full.double(), n_low.double()
    centre = torch.minimum(
        traced_arange(torch.ceil(n_full / cell).long(), torch.float64) * cell + (cell - 1) / 2,
        n_full - 1,
    )
    scale = torch.where(
        (n_full > 1) & (n_low > 1), (n_low - 1) / (n_full - 1).clamp(min=1), n_full * 0
    )
    src = (centre * scale).float()
    i0 = torch.minimum(src.floor(), n_low.float() - 1)
    i1 = torch.minimum(i0 + 1, n_low.float() - 1)
    return i0.long(), i1.long(), src - i0


def _gather2(p: torch.Tensor, ytaps, xtaps) -> torch.Tensor:
    (y0, y1, ly), (x0, x1, lx) = ytaps, xtaps
    ly = ly[:, None]
    p = p.index_select(2, y0) * (1 - ly) + p.index_select(2, y1) * ly
    return p.index_select(3, x0) * (1 - lx) + p.index_select(3, x1) * lx


def noise_sigma(images255: torch.Tensor, cell: int, quantile: float) -> torch.Tensor:
    """`denoise.noise_sigma` on images in 0..255 (float): (N,), 0 under 3 pixels a side."""
    n = images255.shape[0]
    H, W = _hw(images255)
    lum = images255.sum(1, keepdim=True) / (3 * 255)  # (N, 1, H, W)
    rows = _arange(H - 2, cell) + 1  # 1, 1 + cell, .. < H - 1
    lum = F.pad(lum, (1, 1))  # x = -1 .. W: conv at 0..W-1
    stack = torch.cat([lum.index_select(2, rows + d) for d in (-1, 0, 1)], 1)  # (N, 3, R, W+2)
    # [1, -2, 1] along the row of each of the three rows, then [1, -2, 1] across them; as
    # slices, not a convolution: no empty convolution under 3 rows
    row = stack[..., :-2] - 2 * stack[..., 1:-1] + stack[..., 2:]  # (N, 3, R, W): x = 0 .. W-1
    conv = (row[:, 0] - 2 * row[:, 1] + row[:, 2]).abs()  # (N, R, W)
    # blocks of NOISE_BLOCK columns as a one-hot matrix over the interior x = 1 .. W - 2
    x = traced_arange(W.long(), torch.float32)
    nb = torch.ceil(W / NOISE_BLOCK)
    blocks = traced_arange(nb.long(), torch.float32)
    member = (
        (torch.floor(x / NOISE_BLOCK)[:, None] == blocks)
        & (x >= 1)[:, None]
        & (x <= W - 2)[:, None]
    ).float()  # (W, nb)
    counts = member.sum(0)  # (nb,)
    means = conv.matmul(member) * IMMERKAER / counts.clamp(min=1)  # (N, R, nb)
    means = torch.where(counts > 0, means, BIG).reshape(n, -1)
    valid = (counts > 0).float().sum() * torch._shape_as_tensor(rows)[0].float()  # per image
    # the quantile as torch.quantile's 'linear': sorted[lo] + (sorted[hi] - sorted[lo]) w
    means = torch.cat([means, lum[:, 0, 0, :1] * 0 + BIG], 1)  # never empty (under 3 rows)
    ordered, _ = torch.sort(means, 1)
    pos = (quantile * (valid - 1)).clamp(min=0)
    lo = pos.floor()
    hi = torch.minimum(lo + 1, (valid - 1).clamp(min=0))
    v_lo = ordered.index_select(1, lo.long().reshape(1))[:, 0]
    v_hi = ordered.index_select(1, hi.long().reshape(1))[:, 0]
    sigma = v_lo + (pos - lo) * (v_hi - v_lo)
    return torch.where(valid > 0, sigma, v_lo * 0)


def curve_gain(x: torch.Tensor, r: torch.Tensor, steps: int) -> torch.Tensor:
    g = torch.ones_like(x)
    for _ in range(steps):
        g = g * (1 + r * (2 * x - 1))
        x = x + r * (x * x - x)
    return g


def _planes(enhanced255: torch.Tensor) -> torch.Tensor:
    y = enhanced255 / 255
    lum = y.sum(1, keepdim=True) / 3
    return torch.cat([lum, y[:, :1] - lum, y[:, 2:] - lum], 1)


class Denoise(nn.Module):
    """(images, enhanced, r_low) -> the denoised output, `denoise.denoise` with `strength`:
    images and enhanced in 0..255 as float (uint8 values, or unrounded with --float); returns
    float in [0, 1], unrounded."""

    def __init__(self, strength: float, steps: int, cfg: DenoiseConfig = DenoiseConfig()):
        super().__init__()
        self.strength, self.steps, self.cfg = strength, steps, cfg

    def forward(
        self, images: torch.Tensor, enhanced: torch.Tensor, r_low: torch.Tensor
    ) -> torch.Tensor:
        cfg, s = self.cfg, self.cfg.cell
        H, W = _hw(images)
        planes = _planes(enhanced)
        ones = images[:1, :1] * 0 + 1
        lum_in = images.sum(1, keepdim=True) / (3 * 255)
        sums = _cell_sums(torch.cat([planes, planes * planes, lum_in], 1), s)
        count = _cell_sums(ones, s)
        sigma = noise_sigma(images, s, cfg.noise_quantile).clamp(max=cfg.max_sigma)
        h, w = _hw(r_low)
        r = _gather2(r_low.mean(1, keepdim=True), _centre_taps(H, h, s), _centre_taps(W, w, s))
        gain = curve_gain(sums[:, 6:] / count, r, self.steps)
        noise = (gain * gain - 1).clamp(min=0) * sigma[:, None, None, None] ** 2
        coef = []
        for ch, radius, k in (
            (0, cfg.radius_luma, cfg.k_luma),
            (1, cfg.radius_chroma, cfg.k_chroma),
            (2, cfg.radius_chroma, cfg.k_chroma),
        ):
            c = _box(count, radius)
            m = _box(sums[:, ch : ch + 1], radius) / c
            var = (_box(sums[:, 3 + ch : 4 + ch], radius) / c - m * m).clamp(min=0)
            eps = k * self.strength * noise
            a = torch.where(eps > 0, var / (var + eps).clamp(min=TINY_VAR), var * 0 + 1)
            b = m - a * m
            cells = _box(count * 0 + 1, radius)
            coef += [_box(a, radius) / cells, _box(b, radius) / cells]
        A_B = _gather2(torch.cat(coef, 1), _cell_taps(H, s), _cell_taps(W, s))
        q = A_B[:, 0::2] * planes + A_B[:, 1::2]
        L, u, v = q[:, :1], q[:, 1:2], q[:, 2:]
        return torch.cat([L + u, L - u - v, L + v], 1).clamp(0, 1)
