"""What the batcher's worker thread runs: the public `Enhancer` API on a batch of same-size
images, one stacked tensor per forward pass."""

from dataclasses import dataclass

import torch

from model import Enhancer
from model.enhancer import DENOISE

ENHANCE = "enhance"
FACTOR = "factor"


@dataclass(frozen=True, eq=False)
class Work:
    image: torch.Tensor  # (1, 3, H, W) uint8, on the CPU or (decoded there) the model's GPU
    strength: float = 1.0  # scales the factor map; 1 = the model
    task: str = ENHANCE  # FACTOR: only the factor map, no RIE
    denoise: float = DENOISE
    exposure: float | str | None = "auto"  # as Enhancer.enhance takes it
    trace: object = None  # the request's span context: the batch span links to it (tracing.py)
    on_device: bool = False  # the answer stays on the model's device (it is encoded there)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.image.shape[-2:]
        return h, w

    @property
    def key(self) -> tuple:
        """Only work with the same key shares a batch: same task, same (H, W), same denoise
        and exposure (strength may differ within a batch)."""
        return (self.task, *self.size, self.denoise, self.exposure)

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


@dataclass(frozen=True)
class Output:
    image: torch.Tensor | None  # (1, 3, H, W) uint8 on the CPU (on_device: the GPU); FACTOR: None
    factor_lowres: torch.Tensor  # (3, h, w) float32 on the CPU, the strength already applied


def stack(images: list[torch.Tensor]) -> torch.Tensor:
    """One (N, 3, H, W) batch, channels-last like the decoded images. A lone image goes as it
    is (a copy would page-fault a fresh buffer). `torch.cat` would not do: it reads a
    (1, 3, H, W) channels-last tensor's degenerate batch stride as planar and answers planar,
    so each image was transposed on the way in and its answer again before the JPEG encode
    (docs/performance.md, "A batch stays channels-last")."""
    if len(images) == 1:
        return images[0]
    return torch.cat([i.permute(0, 2, 3, 1) for i in images]).permute(0, 3, 1, 2)


def run_batch(enhancer: Enhancer, works: list[Work]) -> list[Output]:
    # one device for the batch: a GPU model gets JPEGs decoded there and others from the CPU
    images = stack([w.image.to(enhancer.device) for w in works])
    if works[0].task == FACTOR:
        r_low = enhancer.factor_lowres(images).cpu()
        return [Output(None, r.clone()) for r in r_low]
    strengths = {w.strength for w in works}
    denoise, exposure = works[0].denoise, works[0].exposure  # one value per batch (key)
    if len(strengths) == 1:
        out, r_low = enhancer.enhance(
            images, strengths.pop(), return_factor=True, denoise=denoise, exposure=exposure
        )
    else:
        # Per-image strength without splitting the batch: exactly what `enhance` does to each
        # image (exposure, x_r scaled, RIE, denoising), with the EFE pass shared.
        scale = torch.tensor([w.strength for w in works], dtype=torch.float32)
        r_low = enhancer.expose(images, enhancer.factor_lowres(images), exposure)
        r_low = r_low * scale.to(r_low.device).view(-1, 1, 1, 1)
        out = enhancer.apply_factor(images, r_low, denoise)
    r_low = r_low.cpu()  # waits for the batch's kernels: answers left on the GPU are complete
    host = out.cpu() if not all(w.on_device for w in works) else out
    # clone: a stored factor map must not keep the whole batch's tensor alive
    return [
        Output((out if w.on_device else host)[i : i + 1], r_low[i].clone())
        for i, w in enumerate(works)
    ]


def warmup_images() -> list[Work]:
    """A batch of two small synthetic images (a dark gradient) with different strengths, so
    the first real request does not pay for lazy initialisation (oneDNN primitives, cuDNN)."""
    ramp = torch.linspace(0, 96, 128).round().to(torch.uint8)
    image = ramp.view(1, 1, 1, -1).expand(1, 3, 96, 128).contiguous()
    return [Work(image, 1.0, ENHANCE), Work(image, 0.5, ENHANCE)]  # denoise on: its kernels
