"""The public model API: `load_model()` and the `Enhancer` it returns.

The CLI, the service and the benchmarks all go through `Enhancer.enhance` / `Enhancer.factor`.
Images are uint8 (N, 3, H, W) tensors; outputs have exactly the input's size, and on the CPU
fast path the input's memory layout too (channels-last in, channels-last out).
"""
import time
from pathlib import Path

import torch

from . import fast as fastpath
from .checkpoint import DEFAULT_CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint
from .efe import EFE
from .rie import downscale, rie, upsample_factor


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU "
                         "(is this the CPU build of torch?)")
    return device


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be torch.uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """round(255 * y) with y clamped to [0, 1]."""
    return y.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


class Enhancer:
    """EFE + RIE on one device, inference only.

    `fast=True` runs the fused path of model/fast.py (numba kernels on CPU, a Triton kernel on
    CUDA, torch ops where neither is installed); `fast=False` the eager reference below, which
    the fast path is tested against. `backend` forces one ("numba", "triton", "torch",
    "eager"); `self.backend` names the one in use.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, fast: bool = True,
                 backend: str | None = None):
        self.checkpoint = checkpoint
        self.device = device
        self.scale_factor = checkpoint.scale_factor
        self.steps = checkpoint.steps
        self.efe = EFE(level=checkpoint.level)
        self.efe.load_state_dict(checkpoint.state_dict)
        self.efe.eval().requires_grad_(False).to(device)
        self.fast = fast and backend != "eager"
        self._fast = (fastpath.build(self.efe, device, self.scale_factor, self.steps, backend)
                      if self.fast else None)
        self.backend = self._fast.name if self.fast else "eager"

    @property
    def sha256(self) -> str:
        return self.checkpoint.sha256

    @torch.inference_mode()
    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        """x_r at EFE's resolution: (N, 3, h, w) float32, h ~ H / scale_factor."""
        check_images(images)
        if self._fast is not None:
            return self._fast.factor_lowres(images.to(self.device))
        x = images.to(self.device).float().div_(255)
        return self.efe(downscale(x, self.scale_factor))

    @torch.inference_mode()
    def factor(self, images: torch.Tensor) -> torch.Tensor:
        """The enhancement factor map x_r: uint8 (N,3,H,W) -> float32 (N,3,H,W) in [-1, 1]."""
        r_low = self.factor_lowres(images)
        return upsample_factor(r_low, tuple(images.shape[-2:]))

    @torch.inference_mode()
    def enhance(self, images: torch.Tensor, strength: float = 1.0,
                return_factor: bool = False):
        """uint8 (N,3,H,W) -> uint8 (N,3,H,W), on the enhancer's device.

        `strength` in [0, 1] scales the factor map (1 = the model, 0 = identity). With
        `return_factor`, also returns the low-resolution factor map (see `factor_lowres`);
        `upsample_factor(r_low, (H, W))` gives the full-size map.
        """
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        r_low = self.factor_lowres(images)
        if strength != 1.0:
            r_low = r_low * float(strength)
        out = self.apply_factor(images, r_low)
        return (out, r_low) if return_factor else out

    @torch.inference_mode()
    def apply_factor(self, images: torch.Tensor, r_low: torch.Tensor) -> torch.Tensor:
        """Upsample x_r, run the RIE steps and round to uint8: the full-resolution part."""
        check_images(images)
        if self._fast is not None:
            return self._fast.apply_factor(images.to(self.device), r_low)
        x = images.to(self.device).float().div_(255)
        r = upsample_factor(r_low.to(self.device), tuple(images.shape[-2:]))
        return to_uint8(rie(x, r, self.steps))

    def warmup(self) -> float:
        """Compile (or load from numba's or Triton's on-disk cache) the fast path's kernels and
        initialise the backend (cuDNN, CUDA context) on a few tiny batches, so that the first
        request does not pay for it. Returns the seconds taken; call once at service start."""
        start = time.perf_counter()
        for n, h, w in ((1, 37, 53), (2, 24, 24)):  # one image and a batch: both code paths
            images = torch.zeros(n, 3, h, w, dtype=torch.uint8)
            self.enhance(images, strength=0.5)
            # decoded images come channels-last (DecodedImage.to_tensor): its own kernels
            self.enhance(images.to(memory_format=torch.channels_last), strength=0.5)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def load_model(checkpoint: str | Path | None = None, device: str | torch.device | None = None,
               fast: bool = True, backend: str | None = None) -> Enhancer:
    """Load EFE+RIE for inference.

    checkpoint: a path to our checkpoint format or a published raw state dict; None loads the
    project's own default checkpoint. device: None picks cuda when available, else cpu.
    fast: the fused path of model/fast.py (benchmarked faster on CPU and CUDA: `sgz bench`);
    False runs the eager reference. backend: force "numba", "triton", "torch" or "eager"
    (None: the fastest one installed for the device).
    """
    if checkpoint is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise CheckpointError(
                f"the default checkpoint {DEFAULT_CHECKPOINT} is not in this build yet; "
                "pass checkpoint=PATH (or --checkpoint PATH) to one you trained with `sgz train`")
        checkpoint = DEFAULT_CHECKPOINT
    return Enhancer(load_checkpoint(checkpoint), resolve_device(device), fast=fast, backend=backend)
