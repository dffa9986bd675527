"""Noise-adaptive denoising after the curve (ours, not the paper's): the eager reference.

RIE brightens a dark pixel by the curve's slope there, and its sensor noise by the same slope:
the output carries ~4x the ground truth's noise on LOL (docs/model-card.md, "Denoising and
exposure"). This
stage removes that noise where the curve put it and leaves the rest alone:

1. sigma, the input's noise (Immerkaer 1996, "Fast noise variance estimation"), on its luma;
2. g, the curve's gain per cell of `cell` x `cell` pixels: the derivative of the eight RIE steps
   chained, g = prod_t (1 + x_r (2 y_t - 1)), at the cell's mean input and factor;
3. a self-guided filter (He, Sun & Tang 2013) on the output's luma L = (R+G+B)/3 and on each of
   its chroma planes R - L and B - L, with eps = k (g^2 - 1) sigma^2 per window, the variance
   the curve added to the input's noise: where the window's variance is at that level it is
   smoothed, edges and texture well above it are kept, and a clean or unbrightened image
   (sigma or g - 1 near 0) comes back unchanged: the input's own noise is the user's.
   Chroma gets a larger k: colour speckle is the most visible noise.

It is a fast guided filter (He & Sun 2015): window statistics are summed per cell over the
image's even rows, the filter's coefficients (a, b) computed and box-averaged at cell
resolution, then upsampled bilinearly and applied per pixel, q = A p + B. The numba backend's
kernels (model/kernels_dn.py, kernels_guided.py) and the Triton backend (torch ops here, then
triton_kernels.denoise_apply) compute exactly this; tests/test_denoise.py and
tests/test_triton.py check them against this file.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .rie import STEPS, to_uint8


@dataclass(frozen=True)
class DenoiseConfig:
    cell: int = 4  # pixels per side of a statistics cell (even)
    radius_luma: int = 1  # window radius in cells: (2 r + 1) cell pixels a side
    radius_chroma: int = 1
    k_luma: float = 3.0  # eps = k * denoise * (g^2 - 1) sigma^2
    k_chroma: float = 16.0
    max_sigma: float = 0.05  # noise estimates above this (in [0, 1] units) are texture, not noise
    noise_quantile: float = 0.25  # of the local noise estimates (see noise_sigma)

    def __post_init__(self):
        if self.cell < 4 or self.cell % 2:
            raise ValueError(f"cell must be even and at least 4, got {self.cell}")


IMMERKAER = np.sqrt(np.pi / 2) / 6  # Immerkaer 1996, Eq. 3: sigma = sqrt(pi/2) / (6 n) sum |I * N|
NOISE_BLOCK = 64  # columns per local noise estimate (one row of a cell row)
TINY_VAR = 1e-30  # keeps var / (var + eps) finite (where eps = 0 it is unused)


@lru_cache(maxsize=256)
def noise_rows(H: int, cell: int) -> np.ndarray:
    """Rows the noise estimate reads: one per cell row (the one at offset 1), interior only."""
    return np.arange(1, H - 1, cell)


def noise_sigma(images: torch.Tensor, cell: int, quantile: float = 0.25) -> torch.Tensor:
    """Immerkaer's estimate of the input's noise std on its luma, in [0, 1] units: (N,) float32.
    |L * N| (N = [[1,-2,1],[-2,4,-2],[1,-2,1]]) on the rows `noise_rows`, averaged over blocks
    of NOISE_BLOCK columns of one row, and the `quantile` of those block estimates taken: edges
    and texture raise some blocks, noise all of them, so a low quantile reads the noise."""
    n, _, H, W = images.shape
    if H < 3 or W < 3:
        return torch.zeros(n, device=images.device)
    lum = images.float().sum(1) / (3 * 255)  # (N, H, W)
    rows = torch.from_numpy(noise_rows(H, cell)).to(images.device)
    up, mid, down = (lum.index_select(1, rows + d) for d in (-1, 0, 1))
    k = torch.tensor([1.0, -2.0, 1.0], device=images.device)
    c_up, c_mid, c_down = (
        k[i] * F.conv1d(t.reshape(-1, 1, W), k.view(1, 1, 3)).reshape(n, len(rows), W - 2)
        for i, t in enumerate((up, mid, down))
    )
    conv = F.pad((c_up + c_mid + c_down).abs(), (1, 1 + (-W) % NOISE_BLOCK))  # x = 0..W-1, zeros
    blocks = conv.reshape(n, len(rows), -1, NOISE_BLOCK).sum(3) * IMMERKAER
    return _block_quantile(blocks, W, quantile)


def block_counts(W: int) -> np.ndarray:
    """Interior pixels (x = 1 .. W - 2) in each block of NOISE_BLOCK columns."""
    x = np.arange(W)
    inside = (x >= 1) & (x <= W - 2)
    return np.add.reduceat(inside, np.arange(0, W, NOISE_BLOCK)).astype(np.float32)


def _block_quantile(sums: torch.Tensor, W: int, quantile: float) -> torch.Tensor:
    """sums (N, rows, blocks) of IMMERKAER |L * N| -> the quantile of the block means (N,)."""
    counts = torch.from_numpy(block_counts(W)).to(sums.device)
    means = (sums / counts.clamp(min=1))[..., counts > 0]
    return torch.quantile(means.reshape(sums.shape[0], -1), quantile, dim=1)


def curve_gain(x: torch.Tensor, r: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """d RIE(x) / dx: each step y + r (y^2 - y) has slope 1 + r (2 y - 1), chained."""
    g = torch.ones_like(x)
    for _ in range(steps):
        g = g * (1 + r * (2 * x - 1))
        x = x + r * (x * x - x)
    return g


@lru_cache(maxsize=256)
def cell_taps(n_full: int, cell: int):
    """Bilinear taps from cell centres (cell i covers pixels [i cell, (i+1) cell)) to pixels:
    (i0, i1, weight of i1) per pixel, as numpy arrays."""
    n_cells = -(-n_full // cell)
    half = np.float32(0.5)
    src = (np.arange(n_full, dtype=np.float32) + half) / np.float32(cell) - half
    src = np.clip(src, 0, n_cells - 1).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_cells - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


@lru_cache(maxsize=256)
def centre_taps(n_full: int, n_low: int, cell: int):
    """Where each cell's centre falls on the factor map (n_low values, align_corners=True as
    `upsample_factor`): (i0, i1, weight of i1)."""
    n_cells = -(-n_full // cell)
    centre = np.minimum(np.arange(n_cells) * cell + (cell - 1) / 2, n_full - 1)
    scale = (n_low - 1) / (n_full - 1) if n_full > 1 and n_low > 1 else 0.0
    src = (centre * scale).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_low - 1)
    i1 = np.minimum(i0 + 1, n_low - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def _cell_sums(p: torch.Tensor, cell: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, ceil(H / cell), ceil(W / cell)) sums over each cell's even rows
    (the statistics skip odd rows: half the work, and 8 samples per cell are plenty)."""
    H, W = p.shape[-2:]
    p = F.pad(p, (0, -W % cell, 0, -H % cell))[..., ::2, :]
    return F.avg_pool2d(p, (cell // 2, cell), divisor_override=1)


def _box(p: torch.Tensor, radius: int) -> torch.Tensor:
    """Sums over (2 radius + 1)^2 windows of cells, zero outside: (N, C, h, w) -> same."""
    c = p.shape[1]
    k = torch.ones(c, 1, 2 * radius + 1, 2 * radius + 1, dtype=p.dtype, device=p.device)
    return F.conv2d(p, k, padding=radius, groups=c)


def _upsample(p: torch.Tensor, H: int, W: int, cell: int) -> torch.Tensor:
    (y0, y1, ly), (x0, x1, lx) = (
        tuple(torch.from_numpy(t).to(p.device) for t in cell_taps(n, cell)) for n in (H, W)
    )
    p = p.index_select(2, y0) * (1 - ly[:, None]) + p.index_select(2, y1) * ly[:, None]
    return p.index_select(3, x0) * (1 - lx) + p.index_select(3, x1) * lx


def cell_gain(
    lum_mean: torch.Tensor, r_low: torch.Tensor, H: int, W: int, cell: int, steps: int
) -> torch.Tensor:
    """g per cell (N, 1, hc, wc): the curve's slope at the cell's mean input luma, for the
    factor map (averaged over channels) at the cell's centre."""
    r = r_low.float().mean(1, keepdim=True)
    (y0, y1, ly), (x0, x1, lx) = (
        tuple(torch.from_numpy(t).to(r.device) for t in centre_taps(n, m, cell))
        for n, m in ((H, r.shape[2]), (W, r.shape[3]))
    )
    r = r.index_select(2, y0) * (1 - ly[:, None]) + r.index_select(2, y1) * ly[:, None]
    r = (r.index_select(3, x0) * (1 - lx) + r.index_select(3, x1) * lx).expand_as(lum_mean)
    return curve_gain(lum_mean, r, steps)


def _planes(enhanced: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, H, W): L, R - L, B - L in [0, 1] units."""
    y = enhanced.float() / 255
    lum = y.sum(1, keepdim=True) / 3
    return torch.cat([lum, y[:, :1] - lum, y[:, 2:] - lum], 1)


def coefficients(
    images: torch.Tensor,
    enhanced: torch.Tensor,
    r_low: torch.Tensor,
    strength: float,
    cfg: DenoiseConfig = DenoiseConfig(),
    steps: int = STEPS,
) -> torch.Tensor:
    """The guided filter's (A, B) of L, R - L and B - L per cell: (N, 6, hc, wc)."""
    s, (n, _, H, W) = cfg.cell, images.shape
    planes = _planes(enhanced)
    ones = torch.ones(1, 1, H, W, device=planes.device)
    lum_in = images.float().sum(1, keepdim=True) / (3 * 255)
    sums = _cell_sums(torch.cat([planes, planes * planes, lum_in], 1), s)  # (N, 7, hc, wc)
    count = _cell_sums(ones, s)
    sigma = noise_sigma(images, s, cfg.noise_quantile).clamp(max=cfg.max_sigma)
    gain = cell_gain(sums[:, 6:] / count, r_low.expand(n, -1, -1, -1), H, W, s, steps)
    # the noise the curve added: (g^2 - 1) sigma^2 (the input's own noise, where g = 1, stays)
    noise = (gain * gain - 1).clamp(min=0) * sigma[:, None, None, None] ** 2  # (N, 1, hc, wc)
    coef = []
    for ch, radius, k in (
        (0, cfg.radius_luma, cfg.k_luma),
        (1, cfg.radius_chroma, cfg.k_chroma),
        (2, cfg.radius_chroma, cfg.k_chroma),
    ):
        c = _box(count, radius)
        m = _box(sums[:, ch : ch + 1], radius) / c
        var = (_box(sums[:, 3 + ch : 4 + ch], radius) / c - m * m).clamp(min=0)
        eps = k * strength * noise
        a = torch.where(eps > 0, var / (var + eps).clamp(min=TINY_VAR), 1.0)  # 1: identity
        b = m - a * m
        cells = _box(torch.ones_like(count), radius)
        coef += [_box(a, radius) / cells, _box(b, radius) / cells]
    return torch.cat(coef, 1)


def apply_coefficients(enhanced: torch.Tensor, coef: torch.Tensor, cell: int) -> torch.Tensor:
    """q = A p + B on L, R - L, B - L, (A, B) upsampled from the cells; back to uint8 RGB."""
    H, W = enhanced.shape[-2:]
    A_B = _upsample(coef, H, W, cell)  # (N, 6, H, W)
    q = A_B[:, 0::2] * _planes(enhanced) + A_B[:, 1::2]  # L', (R-L)', (B-L)'
    L, u, v = q[:, :1], q[:, 1:2], q[:, 2:]
    out = torch.cat([L + u, L - u - v, L + v], 1)
    return to_uint8(out)


def denoise(
    images: torch.Tensor,
    enhanced: torch.Tensor,
    r_low: torch.Tensor,
    strength: float,
    cfg: DenoiseConfig = DenoiseConfig(),
    steps: int = STEPS,
) -> torch.Tensor:
    """images: the uint8 input (N, 3, H, W); enhanced: RIE's uint8 output of it with the factor
    map r_low (N or 1, 3, h, w); strength > 0 scales eps. Returns the denoised uint8 output."""
    coef = coefficients(images, enhanced, r_low, strength, cfg, steps)
    return apply_coefficients(enhanced, coef, cfg.cell)
