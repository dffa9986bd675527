"""RIE: recurrent image enhancement (Zheng & Gupta 2022, Sec. 3.2, Eq. 1).

    x_t = x_{t-1} + x_r * (x_{t-1}^2 - x_{t-1}),   x_0 = input in [0, 1],  t = 1..8

The same x_r is used at every step (Order = 2 quadratic curve, applied recurrently). For
x_r in [-1, 1] and x in [0, 1] every step stays in [0, 1].
"""
import torch
import torch.nn.functional as F

STEPS = 8  # paper Sec. 3.2: eight recurrent steps


def rie(x: torch.Tensor, x_r: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """Eq. 1 applied `steps` times. x, x_r: broadcastable float tensors."""
    for _ in range(steps):
        x = x + x_r * (x * x - x)
    return x


def downscale(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """The image EFE sees: bilinearly downscaled by `scale_factor` (published inference code).

    The low-resolution size is rounded, never below 1 pixel, so any input size works; for sides
    that are multiples of the scale factor this is exactly the published `interpolate(1/scale)`.
    """
    if scale_factor == 1:
        return x
    h, w = x.shape[-2:]
    size = (max(1, round(h / scale_factor)), max(1, round(w / scale_factor)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample_factor(x_r: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The factor map back at the image's exact size (bilinear, align_corners=True, as the
    published `UpsamplingBilinear2d`)."""
    if tuple(x_r.shape[-2:]) == tuple(size):
        return x_r
    return F.interpolate(x_r, size=size, mode="bilinear", align_corners=True)
