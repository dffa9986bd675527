"""Exposure: the factor map shifted so that the output's mean brightness hits a target (ours).

RIE's output at every pixel falls as x_r rises (each step y + x_r (y^2 - y) with y^2 - y <= 0),
so adding one offset to the whole map, clamped to [-1, 1] as the model's own maps are, moves the
mean brightness monotonically from all-black-ish (+2) to all-white-ish (-2): bisection always
finds the target. An offset keeps the map's spatial structure, so the model still decides where
to brighten more; the target only sets how bright the picture is overall.

The mean is estimated on EFE's grid (the input's pixels at the downscale's taps, the factor map
as computed), at most `MAX_SAMPLES` pixels per image, on the CPU (numba): the same numbers for
every backend (`mean_after` and `solve` are numba kernels, model/kernels_exposure.py, imported
on first use).
"""

import numpy as np
import torch

from .rie import STEPS

MAX_SAMPLES = 1024  # pixels per image the mean is estimated on (its error: ~0.2 / 32 = 0.006)
ITERATIONS = 16  # bisection on [-2, 2]: resolution 6e-5 in the offset


def samples(images: torch.Tensor, h: int, w: int) -> tuple[np.ndarray, int]:
    """(N, 3, h', w') float32 in [0, 1]: the input at the nearest pixels of an h x w grid
    (the factor map's), thinned to at most MAX_SAMPLES per image; and the thinning step."""
    H, W = images.shape[-2:]
    step = max(1, int(np.ceil(np.sqrt(h * w / MAX_SAMPLES))))
    ys = np.minimum((np.arange(0, h, step) + 0.5) * H / h, H - 1).astype(np.int64)
    xs = np.minimum((np.arange(0, w, step) + 0.5) * W / w, W - 1).astype(np.int64)
    if images.device.type == "cpu":  # numpy, not torch: see apply_exposure
        px = images.numpy()[:, :, ys][:, :, :, xs]
    else:  # only the samples leave the GPU
        ty, tx = (torch.from_numpy(t).to(images.device) for t in (ys, xs))
        px = images.index_select(2, ty).index_select(3, tx).cpu().numpy()
    return px.astype(np.float32) / np.float32(255), step


def mean_after(x: np.ndarray, r: np.ndarray, offset: float, steps: int, work: np.ndarray) -> float:
    """Mean of RIE(x, clamp(r + offset)) for one image's samples x, r (flat float32); work:
    two scratch arrays of x's length (a numba kernel: model/kernels_exposure.py)."""
    from . import kernels_exposure

    return kernels_exposure.mean_after(x, r, offset, steps, work)


def solve(x: np.ndarray, r: np.ndarray, target: float, steps: int, floor: bool) -> float:
    """Bisection for one image: the offset whose mean output is `target` (with `floor`, 0 when
    the output is already at least that bright)."""
    from . import kernels_exposure

    return kernels_exposure.solve(x, r, target, steps, floor)


def exposure_offset(
    images: torch.Tensor,
    r_low: torch.Tensor,
    target: float,
    steps: int = STEPS,
    floor: bool = False,
    max_lift: float = 2.0,
) -> torch.Tensor:
    """The offset per image (N,) that brings the mean output to `target` in [0, 1]; with
    `floor`, 0 for images whose output is already at least that bright. A target beyond the
    curve's reach (a black frame cannot reach 0.4 in eight steps) gets the nearest end. The
    offset never brightens by more than `max_lift` (it is >= -max_lift)."""
    n = images.shape[0]
    h, w = r_low.shape[-2:]
    x, step = samples(images, h, w)
    r = r_low.detach().float().cpu().expand(n, -1, -1, -1).numpy()[:, :, ::step, ::step]
    offset = [
        solve(
            np.ascontiguousarray(x[i]).ravel(),
            np.ascontiguousarray(r[i]).ravel(),
            float(target),
            steps,
            floor,
        )
        for i in range(n)
    ]
    return torch.tensor(offset, dtype=torch.float32).clamp(min=-max_lift)


def apply_exposure(
    images: torch.Tensor,
    r_low: torch.Tensor,
    target: float,
    steps: int = STEPS,
    floor: bool = False,
    max_lift: float = 2.0,
) -> torch.Tensor:
    """r_low (N or 1, 3, h, w) shifted per image to reach `target`: (N, 3, h, w)."""
    offset = exposure_offset(images, r_low, target, steps, floor, max_lift)
    r = r_low.expand(images.shape[0], -1, -1, -1)
    if r.device.type == "cpu":
        # in numpy: a torch op between the numba kernels wakes torch's OpenMP threads, whose
        # spinning takes the cores from the denoising kernels after it (docs/performance.md,
        # "The denoising stage")
        shifted = r.float().numpy() + offset.numpy()[:, None, None, None]
        return torch.from_numpy(np.clip(shifted, -1, 1, out=shifted))
    return (r + offset.to(r.device)[:, None, None, None]).clamp(-1, 1)
