"""Resampling between the image and EFE's grid: the one size rule and the bilinear taps that
every backend and the eager reference (model/rie.py) use.

- down: the image EFE sees, bilinearly downscaled by `scale_factor` (align_corners=False, as
  the published inference code's `interpolate(1 / scale)`), to `lowres_size`;
- up: the factor map back at the image's exact size (bilinear, align_corners=True, as the
  published `UpsamplingBilinear2d`).
"""

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def lowres_size(h: int, w: int, scale_factor: float) -> tuple[int, int]:
    """EFE's input size for an h x w image: each side divided by `scale_factor` and rounded,
    never below 1 pixel, so any input size works; for sides that are multiples of the scale
    factor this is exactly the published `interpolate(1 / scale)`."""
    if scale_factor == 1:
        return h, w
    return max(1, round(h / scale_factor)), max(1, round(w / scale_factor))


def downscale(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """The image EFE sees (float (N, 3, H, W) in [0, 1]): bilinear to `lowres_size`."""
    if scale_factor == 1:
        return x
    h, w = x.shape[-2:]
    size = lowres_size(h, w, scale_factor)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample_factor(x_r: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The factor map back at the image's exact size (H, W) (bilinear, align_corners=True)."""
    if tuple(x_r.shape[-2:]) == tuple(size):
        return x_r
    return F.interpolate(x_r, size=size, mode="bilinear", align_corners=True)


def taps(n_in: int, n_out: int, align_corners: bool):
    """Source indices and weights of 1-D bilinear resampling, in float32 as PyTorch's CPU
    kernel computes them (area_pixel_compute_source_index + guard_index_and_lambda)."""
    o = np.arange(n_out, dtype=np.float32)
    if align_corners:
        scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        src = scale * o
    else:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.maximum(scale * (o + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam


host_taps = lru_cache(maxsize=256)(taps)  # `taps`, kept: the same sizes come again


@lru_cache(maxsize=256)
def device_taps(n_in: int, n_out: int, align_corners: bool, device: torch.device):
    """`taps` as tensors on the device, kept: a video stream asks for the same few sizes."""
    return tuple(torch.from_numpy(t).to(device) for t in taps(n_in, n_out, align_corners))


def efe_input(images: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """`downscale(images / 255)` from uint8 (N, 3, H, W), reading only the 4 source pixels of
    each output pixel instead of making the whole image float first."""
    if scale_factor == 1:
        return images.float().div_(255)
    H, W = images.shape[-2:]
    h, w = lowres_size(H, W, scale_factor)
    y0, y1, ly = device_taps(H, h, False, images.device)
    x0, x1, lx = device_taps(W, w, False, images.device)
    rows = images.index_select(2, torch.cat([y0, y1]))
    v = rows.index_select(3, torch.cat([x0, x1])).float().div_(255)
    t = v[..., :w] * (1 - lx) + v[..., w:] * lx
    ly = ly[:, None]
    return t[:, :, :h] * (1 - ly) + t[:, :, h:] * ly
