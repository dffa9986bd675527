"""EFE: enhancement factor extraction (Zheng & Gupta 2022, Sec. 3.1, Fig. 2).

A 7-block fully convolutional network of depthwise-separable convolutions with symmetric
skip concatenations. It maps an RGB image in [0, 1] to the enhancement factor x_r in [-1, 1],
one value per pixel and channel. 10,561 parameters (paper: "0.011 M").

`EFE(level=True)` is ours, not the paper's: two more parameters that scale each image's x_r by a
gain set by the image's mean brightness (`level_gain`). EFE's receptive field is ~15 pixels of
its downscaled input, so it can only set a map's level from local brightness, and a level that
follows the scene then comes with a map that varies inside the image (model card, finding 22);
the gain gives the level a global input. At zero it is the identity, so a published checkpoint
is `level=False`, and `level=True` starts training where the paper's network does.

`EFEConfig` is the architecture as data: checkpoints store it (model/checkpoint.py) and the
network is rebuilt from it on load.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 32  # paper Sec. 3.1: 32 feature maps per block
LEVEL_EPS = 1 / 255  # one grey level: a black frame's log-brightness stays finite
LEVEL_REF = 0.5  # mid-grey: centres the log-brightness, so the gain's two parameters
# (log-gain at mid-grey, its slope) are not learned against each other


@dataclass(frozen=True)
class EFEConfig:
    """EFE's architecture: what a checkpoint needs besides its weights to rebuild the network."""

    features: int = FEATURES  # feature maps per block
    level: bool = False  # our level gain (two more parameters)
    blocks: int = 7  # paper Fig. 2; fixed: stored so that a file says what it holds

    def __post_init__(self):
        if (
            isinstance(self.features, bool)
            or not isinstance(self.features, int)
            or self.features < 1
        ):
            raise ValueError(f"EFE features must be a positive integer, got {self.features!r}")
        if not isinstance(self.level, bool):
            raise ValueError(f"EFE level must be true or false, got {self.level!r}")
        if self.blocks != 7:
            raise ValueError(f"EFE has 7 blocks (paper Fig. 2), got {self.blocks!r}")

    def to_dict(self) -> dict:
        """As stored in a checkpoint's "arch" entry."""
        return {"name": "efe", **asdict(self)}

    @classmethod
    def from_dict(cls, arch: dict) -> "EFEConfig":
        """From a checkpoint's "arch" entry; ValueError for anything else."""
        if not isinstance(arch, dict) or arch.get("name") != "efe":
            raise ValueError(f"not an EFE architecture: {arch!r}")
        unknown = set(arch) - {"name", "features", "level", "blocks"}
        if unknown:
            raise ValueError(f"unknown EFE architecture fields {sorted(unknown)}")
        return cls(**{k: v for k, v in arch.items() if k != "name"})


def level_gain(mu, level):
    """exp(level[0] + level[1] * log((mu + LEVEL_EPS) / LEVEL_REF)), mu the mean of EFE's input
    over pixels and channels. A power law in the brightness: a negative slope lifts dark scenes
    more and bright ones less. Torch tensors, or float32 numpy arrays (the numba backend: no
    torch op between its kernels)."""
    xp = np if isinstance(mu, np.ndarray) else torch
    return xp.exp(level[0] + level[1] * xp.log((mu + LEVEL_EPS) / LEVEL_REF))


def apply_level(x_r: torch.Tensor, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """x_r scaled by `level_gain` of EFE's input x, clamped to [-1, 1]: outside it RIE's curve
    (Eq. 1) would no longer be monotonic in [0, 1]."""
    return (x_r * level_gain(x.float().mean((1, 2, 3), keepdim=True), level)).clamp(-1, 1)


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise conv (groups = in channels) followed by a 1x1 pointwise conv.

    Attribute names match the published checkpoints' keys (`depth_conv`, `point_conv`).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.depth_conv = nn.Conv2d(in_ch, in_ch, kernel_size=3, padding=1, groups=in_ch)
        self.point_conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class EFE(nn.Module):
    def __init__(self, features: int = FEATURES, level: bool = False):
        super().__init__()
        self.config = EFEConfig(features=features, level=level)
        f = features
        self.e_conv1 = DepthwiseSeparableConv(3, f)
        self.e_conv2 = DepthwiseSeparableConv(f, f)
        self.e_conv3 = DepthwiseSeparableConv(f, f)
        self.e_conv4 = DepthwiseSeparableConv(f, f)
        self.e_conv5 = DepthwiseSeparableConv(2 * f, f)
        self.e_conv6 = DepthwiseSeparableConv(2 * f, f)
        self.e_conv7 = DepthwiseSeparableConv(2 * f, 3)
        # (log-gain at mid-grey, slope of log-gain in log-brightness): zero is the identity
        self.level = nn.Parameter(torch.zeros(2)) if level else None

    @classmethod
    def from_config(cls, config: EFEConfig) -> "EFE":
        return cls(features=config.features, level=config.level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, h, w) in [0, 1] -> x_r: (N, 3, h, w) in [-1, 1]."""
        x1 = F.relu(self.e_conv1(x))
        x2 = F.relu(self.e_conv2(x1))
        x3 = F.relu(self.e_conv3(x2))
        x4 = F.relu(self.e_conv4(x3))
        x5 = F.relu(self.e_conv5(torch.cat([x3, x4], 1)))
        x6 = F.relu(self.e_conv6(torch.cat([x2, x5], 1)))
        x_r = torch.tanh(self.e_conv7(torch.cat([x1, x6], 1)))
        if self.level is not None:
            x_r = apply_level(x_r, x, self.level)
        return x_r

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Paper Sec. 4.1: filter weights initialised from N(0, 0.02), biases 0. The level
        stays at zero (the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.normal_(0.0, std, generator=generator)
                    assert m.bias is not None  # every EFE convolution has a bias
                    m.bias.zero_()
