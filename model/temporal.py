"""Temporal stability for video (ours): what frame-by-frame enhancement flickers with, and the
state that removes it.

Frame by frame, two things change from one frame to the next that the scene does not:
1. the exposure: a night camera's auto-exposure pumps, and the model, set by each frame's
   brightness, follows it. `factor` smooths the factor map (at EFE's resolution: cheap) and
   the output brightness it gives across frames, then shifts the smoothed map (exposure.py) to
   hit the smoothed brightness exactly, so the level changes only as fast as the scene does.
2. the noise: the curve amplifies sensor noise that is new in every frame; the spatial
   denoiser (denoise.py) leaves a residue that crawls. `denoise` is a motion-adaptive
   recursive filter: each output pixel moves from the running average towards the new frame
   by a weight that grows with their difference averaged over a small window (noise averages
   out there, motion does not), measured in units of the frame's output noise (the input's
   noise times the curve's gain), so static areas average over ~1/min_weight frames and moving
   things follow at once instead of ghosting.
Both restart at a scene cut: a new shot must not inherit the old one's level or pixels.
The recursive filter and the noise estimate run through the enhancer's backend
(model/backends/base.py: `frame_noise`, `temporal_filter`): numba kernels on the numba
backend, the torch reference (`filter_reference`) on the others.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .denoise import DenoiseConfig
from .exposure import mean_after, samples, solve

NOISE_QUANTILE = DenoiseConfig().noise_quantile  # as the spatial denoiser reads the noise


@dataclass(frozen=True)
class TemporalConfig:
    factor_weight: float = 0.5  # a new frame's share of the smoothed factor map
    level_weight: float = 0.15  # ... of the smoothed output brightness (~7 frames' memory)
    cut: float = 0.5  # scene cut: change of the coarse luma above this (_cut)
    noise_k: float = 3.5  # motion threshold of the recursive filter, in output noise stds
    radius: int = 2  # window (2 radius + 1)^2 the frame difference is averaged over
    min_weight: float = 0.1  # a new frame's least share where nothing moves
    cell: int = 4  # rows of the noise estimate (denoise.noise_rows)


class TemporalState:
    """The state of one video stream: smoothed factor map and brightness, the previous
    frame's coarse luma, the recursive filter's running average."""

    def __init__(self, enhancer, config: TemporalConfig):
        self.enhancer, self.config = enhancer, config
        self.cuts = 0
        # the recursive filter writes the next average here, then swaps
        self.spare: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.r_s: np.ndarray | None = None  # the smoothed factor map
        self.level: float | None = None  # the smoothed output brightness (set with r_s)
        self.coarse: tuple[np.ndarray, float] | None = None  # the last frame's (luma, mean)
        self.acc: torch.Tensor | None = None  # the recursive filter's running average
        self.cut_at: list[int] = []  # frames of the last batch `factor` found a cut before

    # ---- 1. exposure ----------------------------------------------------------------------

    def factor(self, frames: torch.Tensor, r_low: torch.Tensor, exposure) -> torch.Tensor:
        """r_low (N, 3, h, w) of N consecutive frames -> the smoothed maps to apply."""
        cfg, steps = self.config, self.enhancer.steps
        r_e = self.enhancer.expose(frames, r_low, exposure).float().cpu().numpy()
        x, step = samples(frames, *r_low.shape[-2:])
        out = np.empty_like(r_e)
        work = np.empty((2, x[0].size), np.float32)
        self.cut_at = []
        for i in range(len(r_e)):
            xi = np.ascontiguousarray(x[i]).ravel()
            if self._cut(x[i]):  # the filter's average restarts at this frame (denoise)
                self.r_s = self.level = None
                self.cut_at.append(i)
                self.cuts += 1
            level = mean_after(xi, _flat(r_e[i], step), 0.0, steps, work)
            if self.r_s is None or self.level is None:  # both None or both set
                self.r_s, self.level = r_e[i].copy(), level
            else:
                self.r_s += cfg.factor_weight * (r_e[i] - self.r_s)
                self.level += cfg.level_weight * (level - self.level)
            offset = solve(xi, _flat(self.r_s, step), float(self.level), steps, False)
            np.clip(self.r_s + np.float32(offset), -1, 1, out=out[i])
        return torch.from_numpy(out).to(r_low.device)

    def _cut(self, x: np.ndarray) -> bool:
        """A scene cut: the luma on a coarse grid (blocks of 4 x 4 samples: noise averages
        out, a pan moves little), relative to its mean, differs from the previous frame's by
        more than `cut` on average, counting the change of the mean's log too (a pumping
        camera changes it by a few percent per frame). Measured on shots of the dev clip and
        of pans over sice-real photos: 0.08-0.32 within shots, 0.76-1.7 across cuts."""
        lum = x.mean(0)
        b = max(1, min(4, lum.shape[0] // 4, lum.shape[1] // 4))
        h, w = lum.shape[0] // b * b, lum.shape[1] // b * b
        lum = lum[:h, :w].reshape(h // b, b, w // b, b).mean((1, 3))
        mean = float(lum.mean()) + 1e-3
        prev, self.coarse = self.coarse, (lum / mean, mean)
        if prev is None:
            return False
        change = np.abs(lum / mean - prev[0]).mean() + abs(np.log(mean / prev[1]))
        return float(change) > self.config.cut

    # ---- 2. noise -------------------------------------------------------------------------

    def denoise(
        self, frames: torch.Tensor, out: torch.Tensor, r_low: torch.Tensor, strength: float
    ) -> torch.Tensor:
        """out (N, 3, H, W) uint8, RIE's output of `frames` with maps r_low -> filtered
        (channels-last)."""
        if strength <= 0:
            self.acc = None
            return out
        k = self.config.noise_k * strength * self.output_noise(frames, r_low) * 255
        k = np.maximum(k, 0.5).astype(np.float32)  # grey levels
        return self._filter(out, k)

    def output_noise(self, frames: torch.Tensor, r_low: torch.Tensor) -> np.ndarray:
        """(N,) the output's noise std before denoising, in [0, 1] units: the input's
        (Immerkaer, denoise.noise_sigma) times the curve's mean slope on EFE's grid."""
        sigma = self.enhancer.engine.frame_noise(frames, self.config.cell, NOISE_QUANTILE)
        x, step = samples(frames, *r_low.shape[-2:])
        r = r_low.float().cpu().numpy()[:, :, ::step, ::step]
        return sigma * curve_slope(x, r, self.enhancer.steps).reshape(len(x), -1).mean(1)

    def _filter(self, out: torch.Tensor, k: np.ndarray) -> torch.Tensor:
        """The recursive filter over the batch's frames in order, through the backend."""
        cfg, engine = self.config, self.enhancer.engine
        frames = out.permute(0, 2, 3, 1).contiguous()  # (N, H, W, 3): no copy if channels-last
        result = torch.empty_like(frames)
        for i in range(len(frames)):
            if i in self.cut_at:
                self.acc = None
            if self.acc is None or self.acc.shape != frames[i].shape:  # a first frame (or a
                self.acc = frames[i].float()  # new size) starts the running average as it is
                result[i] = frames[i]
                continue
            new = engine.temporal_filter(
                self.acc, frames[i], result[i], float(k[i]), cfg.radius, cfg.min_weight, self.spare
            )
            self.acc, self.spare = new, self.acc
        return result.permute(0, 3, 1, 2)


def _flat(r: np.ndarray, step: int) -> np.ndarray:
    return np.ascontiguousarray(r[:, ::step, ::step]).ravel()


def curve_slope(x: np.ndarray, r: np.ndarray, steps: int) -> np.ndarray:
    """d RIE(x) / dx as denoise.curve_gain, in numpy (between numba kernels, see exposure)."""
    g = np.ones_like(x)
    for _ in range(steps):
        g *= 1 + r * (2 * x - 1)
        x = x + r * (x * x - x)
    return g


def filter_reference(
    acc: torch.Tensor, frame: torch.Tensor, k: float, radius: int, min_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recursive filter in torch ops (CUDA, and the numba kernel's reference).
    acc (H, W, 3) float32 running average, frame (H, W, 3) uint8 -> (new acc, uint8 output)."""
    d = (frame.float() - acc).mean(-1)  # (H, W)
    size = 2 * radius + 1
    d = F.avg_pool2d(d[None, None], size, 1, radius, count_include_pad=False)[0, 0]
    w = (d.abs() / k).clamp_(min_weight, 1)[..., None]  # (H, W, 1)
    acc = acc + w * (frame.float() - acc)
    return acc, (acc + 0.5).clamp_(0, 255).to(torch.uint8)
