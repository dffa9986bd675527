"""`backend="eager"`: the reference the other backends are tested against, in plain PyTorch
as the published inference code computes it: images to float, bilinear downscale, EFE,
bilinear upsampling of x_r, the RIE steps (Eq. 1), rounding; then the torch denoiser."""

import torch

from ..denoise import DenoiseConfig
from ..denoise import denoise as denoise_reference
from ..resample import downscale, upsample_factor
from ..rie import rie, to_uint8
from .base import NO_DENOISE, Backend, check_factor


class EagerBackend(Backend):
    """Any device PyTorch runs on."""

    name = "eager"

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        return self.efe(downscale(images.float().div_(255), self.scale_factor))

    def apply_factor(
        self,
        images: torch.Tensor,
        r_low: torch.Tensor,
        denoise: float = 0.0,
        config: DenoiseConfig = NO_DENOISE,
    ) -> torch.Tensor:
        check_factor(images, r_low)
        r_low = r_low.to(images.device)
        x = images.float().div_(255)
        out = to_uint8(rie(x, upsample_factor(r_low, tuple(images.shape[-2:])), self.steps))
        if denoise > 0:
            out = denoise_reference(images, out, r_low, float(denoise), config, self.steps)
        return out
