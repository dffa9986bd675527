"""`backend="triton"` (CUDA): EFE (at 1/144 of the pixels) in cuDNN as the torch backend; the
full-size pass, factor upsampling + RIE + rounding, as one Triton kernel, and the denoiser's
last pass as another (model/triton_kernels.py). On a CPU tensor it runs only under Triton's
interpreter (`TRITON_INTERPRET=1`: the tests' way to check it without a GPU)."""

import importlib.util
import logging
import os
import shutil
from contextlib import nullcontext
from functools import lru_cache

import torch

from ..denoise import DenoiseConfig, cell_taps, coefficients
from ..efe import EFE
from ..resample import device_taps, efe_input
from .base import NO_DENOISE, Availability, channels_last, check_factor
from .torch_fused import TorchBackend

log = logging.getLogger("sgz.model")


@lru_cache(maxsize=256)
def cell_taps_on(n: int, cell: int, device: torch.device):
    """`denoise.cell_taps` as tensors on the device, kept."""
    return tuple(torch.from_numpy(t).to(device) for t in cell_taps(n, cell))


def c_compiler() -> str | None:
    """The compiler Triton would use: $CC, else cc, gcc or clang on the PATH."""
    return os.environ.get("CC") or next(
        filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None
    )


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonBackend(TorchBackend):
    name = "triton"

    @classmethod
    def available(cls, device: torch.device) -> Availability:
        if not installed():
            return Availability(False, "triton is not installed (the gpu extra)")
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return Availability(True)
        return Availability(
            False,
            "the triton backend runs on CUDA GPUs only (the CPU only under TRITON_INTERPRET=1)",
        )

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        # cuDNN's depthwise convolutions run faster on NHWC maps (bench/gpu_efe.py); Module.to
        # takes memory_format (documented), which torch's overload stubs leave out
        nhwc = efe.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        super().__init__(nhwc, scale_factor, steps)

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        x = efe_input(images, self.scale_factor).contiguous(memory_format=torch.channels_last)
        return self.efe(x).contiguous()

    def apply_factor(
        self,
        images: torch.Tensor,
        r_low: torch.Tensor,
        denoise: float = 0.0,
        config: DenoiseConfig = NO_DENOISE,
    ) -> torch.Tensor:
        from .. import triton_kernels  # imported on first use: triton is slow to import

        check_factor(images, r_low)
        cl = channels_last(images)
        if not cl:
            images = images.contiguous()
        out = torch.empty_like(images)  # same layout as the input: answered as it came
        r = r_low.detach().to(images.device, torch.float32).contiguous()
        (n, _, H, W), (h, w) = images.shape, r.shape[-2:]
        length = 3 * W if cl else W  # values per program row
        blocks = -(-length // triton_kernels.BLOCK)
        rows = n * H if cl else n * 3 * H
        s_r_n = r.stride(0) if r.shape[0] == n else 0
        with torch.cuda.device(images.device) if images.is_cuda else nullcontext():
            triton_kernels.rie_uint8[(rows * blocks,)](
                images,
                out,
                r,
                *device_taps(h, H, True, images.device),
                *device_taps(w, W, True, images.device),
                H,
                W,
                blocks,
                images.stride(0),
                images.stride(2),
                images.stride(1),
                out.stride(0),
                out.stride(2),
                out.stride(1),
                s_r_n,
                r.stride(1),
                r.stride(2),
                STEPS=self.steps,
                CHANNELS_LAST=cl,
                BLOCK=triton_kernels.BLOCK,
            )
        if denoise > 0:  # statistics and coefficients in torch ops, the full-size pass fused
            out = self._denoise(images, out, r, denoise, config)
        return out

    def _denoise(self, images, enhanced, r, denoise, config):
        from .. import triton_kernels

        coef = coefficients(images, enhanced, r, denoise, config, self.steps).contiguous()
        out = torch.empty_like(enhanced)
        (n, _, H, W), (hc, wc) = enhanced.shape, coef.shape[-2:]
        blocks = -(-W // triton_kernels.BLOCK)
        s_n, s_c, s_y, s_x = enhanced.stride()
        with torch.cuda.device(images.device) if images.is_cuda else nullcontext():
            triton_kernels.denoise_apply[(n * H * blocks,)](
                enhanced,
                out,
                coef,
                *cell_taps_on(H, config.cell, images.device),
                *cell_taps_on(W, config.cell, images.device),
                H,
                W,
                blocks,
                hc,
                wc,
                s_n,
                s_y,
                s_x,
                s_c,
                BLOCK=triton_kernels.BLOCK,
            )
        return out
