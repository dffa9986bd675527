"""RIE: recurrent image enhancement (Zheng & Gupta 2022, Sec. 3.2, Eq. 1).

    x_t = x_{t-1} + x_r * (x_{t-1}^2 - x_{t-1}),   x_0 = input in [0, 1],  t = 1..8

The same x_r is used at every step (Order = 2 quadratic curve, applied recurrently). For
x_r in [-1, 1] and x in [0, 1] every step stays in [0, 1]. The resampling between the image
and EFE's grid (`downscale`, `upsample_factor`) lives in model/resample.py.
"""

import torch

from .resample import downscale, upsample_factor  # noqa: F401 (re-exported: model.rie's API)

STEPS = 8  # paper Sec. 3.2: eight recurrent steps


def rie(x: torch.Tensor, x_r: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """Eq. 1 applied `steps` times. x, x_r: broadcastable float tensors."""
    for _ in range(steps):
        x = x + x_r * (x * x - x)
    return x


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """round(255 * y) with y clamped to [0, 1], in place on y (round half to even)."""
    return y.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
