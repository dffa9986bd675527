"""`backend="torch"`: the fused formulation in plain torch ops, on any device (the CUDA path
where Triton cannot run, a CPU without numba). EFE's input is gathered from the 4 source pixels
of each of its pixels (`resample.efe_input`), not from a float copy of the whole image, and the
RIE steps run in place on one float copy: the same roundings as the eager reference."""

import torch

from ..denoise import DenoiseConfig
from ..denoise import denoise as denoise_reference
from ..resample import efe_input, upsample_factor
from ..rie import to_uint8
from .base import NO_DENOISE, Backend, check_factor


class TorchBackend(Backend):
    name = "torch"

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        return self.efe(efe_input(images, self.scale_factor))

    def apply_factor(
        self,
        images: torch.Tensor,
        r_low: torch.Tensor,
        denoise: float = 0.0,
        config: DenoiseConfig = NO_DENOISE,
    ) -> torch.Tensor:
        check_factor(images, r_low)
        x = images.float().div_(255)
        r = upsample_factor(r_low.to(images.device, torch.float32), tuple(images.shape[-2:]))
        t = torch.empty_like(x)
        for _ in range(self.steps):  # Eq. 1, in place: the same roundings as rie()
            torch.mul(x, x, out=t).sub_(x).mul_(r)
            x.add_(t)
        out = to_uint8(x)
        if denoise > 0:
            out = denoise_reference(images, out, r_low, denoise, config, self.steps)
        return out
