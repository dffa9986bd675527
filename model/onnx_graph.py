"""The enhancer as one exportable graph: downscale, EFE (+ level gain), exposure and denoising
when asked (their pieces in model/onnx_stages.py), factor upsampling, the RIE steps and
rounding, in torch ops whose ONNX export keeps the batch, height and width dynamic.

The two resizes are written as gathers of explicit bilinear taps, not `F.interpolate`: exported,
that becomes ONNX Resize, whose `pytorch_half_pixel` mode reads pixel 0 for a 1-pixel output
where PyTorch reads the centre (images under 18 pixels a side), and every size arithmetic here is
a tensor op on the input's shape, so the tracer records it instead of baking in one size.
The taps are those of `resample.downscale` (align_corners=False) and `resample.upsample_factor`
(align_corners=True); tests/test_export.py checks the graph against `Enhancer` under ONNX Runtime.
"""

from typing import cast

import torch
from torch import nn

from .efe import EFE


def _hw(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) as float tensors: traced as Shape ops, so the graph works at any size."""
    shape = torch._shape_as_tensor(images).float()
    return shape[2], shape[3]


def traced_arange(end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.arange(end) with `end` a traced 0-d tensor, so the size stays dynamic in the
    graph; torch's stubs type `end` as a number only, hence the cast."""
    return torch.arange(cast(int, end), dtype=dtype)


def _taps(n_in: torch.Tensor, n_out: torch.Tensor, align_corners: bool):
    """Bilinear taps from n_in source pixels to n_out: (i0, i1, weight of i1), PyTorch's
    `area_pixel_compute_source_index` formulas (upsample_bilinear2d)."""
    i = traced_arange(n_out.long(), torch.float32)  # n_out traced: stays dynamic
    if align_corners:  # scale (in - 1) / (out - 1), 0 for a 1-pixel output
        src = i * ((n_in - 1) / (n_out - 1).clamp(min=1))
    else:  # half-pixel centres, clamped at 0 as PyTorch does
        src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0.long(), i1.long(), src - i0


def resize(
    x: torch.Tensor,
    size: tuple[torch.Tensor, torch.Tensor],
    align_corners: bool,
    divisor: float = 1.0,
) -> torch.Tensor:
    """x (N, C, h, w), any dtype, bilinearly resized to `size` as float32 / `divisor`: rows
    first, gathered in x's own dtype (uint8 images: 4x less memory before the float)."""
    h_in, w_in = _hw(x)
    y0, y1, ly = _taps(h_in, size[0], align_corners)
    x0, x1, lx = _taps(w_in, size[1], align_corners)
    ly = ly[:, None]
    t = (
        x.index_select(2, y0).float() / divisor * (1 - ly)
        + x.index_select(2, y1).float() / divisor * ly
    )
    return t.index_select(3, x0) * (1 - lx) + t.index_select(3, x1) * lx


def lowres_size(H: torch.Tensor, W: torch.Tensor, scale_factor: float):
    """`resample.lowres_size`, the one size rule, as graph ops (the exported graph takes any
    size): max(1, round(side / scale)); torch.round is half-to-even, as Python's round()."""
    return (torch.round(H / scale_factor).clamp(min=1), torch.round(W / scale_factor).clamp(min=1))


class FactorLowres(nn.Module):
    """images (N, 3, H, W) -> x_r at EFE's resolution, as `Enhancer.factor_lowres`."""

    def __init__(self, efe: EFE, scale_factor: float, float_input: bool = False):
        super().__init__()
        self.efe, self.scale_factor = efe, scale_factor
        self.divisor = 1.0 if float_input else 255.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        H, W = _hw(images)
        x = resize(images, lowres_size(H, W, self.scale_factor), False, self.divisor)
        return self.efe(x)


class ApplyFactor(nn.Module):
    """(images, x_r low-res) -> the RIE output at the images' size, as `Enhancer.apply_factor`
    with denoise=0: uint8, or float in [0, 1] unrounded with `float_io`; with `denoise` (an
    onnx_stages.Denoise) the denoising stage after it, on the rounded uint8 values."""

    def __init__(self, steps: int, float_io: bool = False, denoise: nn.Module | None = None):
        super().__init__()
        self.steps, self.float_io, self.denoise = steps, float_io, denoise

    def forward(self, images: torch.Tensor, r_low: torch.Tensor) -> torch.Tensor:
        x = images.float() if self.float_io else images.float() / 255
        r = resize(r_low, _hw(images), True)
        for _ in range(self.steps):  # Eq. 1, the same roundings as rie.rie
            x = x + r * (x * x - x)
        x = x.clamp(0, 1)
        if self.denoise is not None:  # on 0..255 values: the reference's uint8 arithmetic
            y = torch.round(x * 255)  # enhance denoises the rounded output, --float too
            x = self.denoise(images.float() * 255 if self.float_io else images.float(), y, r_low)
        return x if self.float_io else torch.round(x * 255).to(torch.uint8)


class EnhanceGraph(nn.Module):
    """The whole step: `enhance(images, denoise=0, exposure=None)`; with `expose` (an
    onnx_stages.ExposureShift) and `denoise` (an onnx_stages.Denoise) those stages too, i.e.
    `enhance(images, denoise=..., exposure=...)`; or with `factor_only` `factor(images)` (x_r
    at full size, float32 in [-1, 1])."""

    def __init__(
        self,
        efe: EFE,
        scale_factor: float,
        steps: int,
        factor_only: bool = False,
        float_io: bool = False,
        expose: nn.Module | None = None,
        denoise: nn.Module | None = None,
    ):
        super().__init__()
        self.lowres = FactorLowres(efe, scale_factor, float_io)
        self.rie = ApplyFactor(steps, float_io, denoise)
        self.expose = expose
        self.factor_only = factor_only

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r_low = self.lowres(images)
        if self.factor_only:
            return resize(r_low, _hw(images), True)
        if self.expose is not None:
            r_low = self.expose(images, r_low)
        return self.rie(images, r_low)
