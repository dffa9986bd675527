"""The interface every inference backend implements (model/backends/__init__.py lists them).

A backend runs the same EFE + RIE arithmetic in its own way, in two halves, so that exposure
and strength apply to the factor map between them on every backend:
- `factor_lowres(images)`: uint8 (N, 3, H, W) -> x_r at EFE's resolution (model/resample.py's
  size rule), float32 (N, 3, h, w);
- `apply_factor(images, r_low, denoise, config)`: upsample x_r, the RIE steps, round to uint8,
  then the denoising stage (model/denoise.py) at strength `denoise` (0 = off).
Video's recursive filter (model/temporal.py) runs through `frame_noise` and `temporal_filter`;
their torch references here serve every backend that does not bring its own kernels.
Inputs arrive on the backend's device, already validated (`Enhancer.check_images`).
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..denoise import DenoiseConfig, noise_sigma
from ..efe import EFE

NO_DENOISE = DenoiseConfig()


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on a device; `reason` says why not. Truthy when it can."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def channels_last(images: torch.Tensor) -> bool:
    """(N, 3, H, W) stored as (N, H, W, 3): what `DecodedImage.to_tensor` gives."""
    return images.dim() == 4 and images.permute(0, 2, 3, 1).is_contiguous()


def check_factor(images: torch.Tensor, r_low: torch.Tensor) -> None:
    if r_low.dim() != 4 or r_low.shape[1] != 3 or r_low.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"factor map must have shape (1 or {images.shape[0]}, 3, h, w), "
            f"got {tuple(r_low.shape)}"
        )


class Backend:
    """One inference path. Subclasses set `name` and implement the two halves."""

    name = ""

    @classmethod
    def available(cls, device: torch.device) -> Availability:
        """Whether this backend runs on `device` here (its packages installed, the device one
        it supports); the reason when not."""
        return Availability(True)

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        self.efe, self.scale_factor, self.steps = efe, scale_factor, steps

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_factor(
        self,
        images: torch.Tensor,
        r_low: torch.Tensor,
        denoise: float = 0.0,
        config: DenoiseConfig = NO_DENOISE,
    ) -> torch.Tensor:
        raise NotImplementedError

    # ---- video (model/temporal.py) ---------------------------------------------------------

    def frame_noise(self, frames: torch.Tensor, cell: int, quantile: float) -> np.ndarray:
        """(N,) the input frames' noise std in [0, 1] units (denoise.noise_sigma)."""
        return noise_sigma(frames, cell, quantile).cpu().numpy()

    def temporal_filter(
        self,
        acc: torch.Tensor,
        frame: torch.Tensor,
        out: torch.Tensor,
        k: float,
        radius: int,
        min_weight: float,
        spare: torch.Tensor | None,
    ) -> torch.Tensor:
        """One step of video's recursive filter: acc (H, W, 3) float32, the running average;
        frame (H, W, 3) uint8; the filtered frame is written into out (H, W, 3) uint8. Returns
        the new running average (written into `spare`, same shape as acc, where a backend
        can reuse it). The torch reference: `temporal.filter_reference`."""
        from ..temporal import filter_reference

        acc, filtered = filter_reference(acc, frame, k, radius, min_weight)
        out.copy_(filtered)
        return acc
