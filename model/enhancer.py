"""The public model API: `load_model()` and the `Enhancer` it returns.

The CLI, the service and the benchmarks all go through `Enhancer.enhance` / `Enhancer.factor`.
Images are uint8 (N, 3, H, W) tensors; outputs have exactly the input's size, and on the numba
and Triton backends the input's memory layout too (channels-last in, channels-last out). The
arithmetic runs in one of the backends of model/backends/ (`load_model(backend=...)`).
"""

import time
import warnings
from pathlib import Path

import torch

from . import backends
from .checkpoint import DEFAULT_CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint
from .denoise import DenoiseConfig
from .efe import EFE
from .exposure import apply_exposure
from .resample import upsample_factor

# The defaults of `enhance` (chosen on lol-pairs and sice-real: docs/model-card.md, "Denoising
# and exposure"). denoise: 0 = off, 1 = eps as tuned, more = stronger (up to MAX_DENOISE).
DENOISE = 1.0
MAX_DENOISE = 4.0
# exposure: "auto" lifts images the model leaves darker than AUTO_EXPOSURE up to it and keeps
# the model's level above; a number is an exact target mean brightness; None the model's level.
AUTO_EXPOSURE = 0.40
# ...shifting the factor map by at most this much: near-black frames (SICE-real's 126 and 450,
# mean input 0.003-0.011) would otherwise get the whole curve (offset -2) and their noise and
# banding with it; LOL's darkest input needs -0.26
AUTO_MAX_LIFT = 0.3
EXPOSURE_RANGE = (0.05, 0.95)


def parse_exposure(text: str) -> float | str | None:
    """The exposure option as the CLI and the query string spell it: "auto", "model" (the
    model's own level) or a number. ValueError otherwise or out of range."""
    text = text.strip().lower()
    if text in ("auto", "model"):
        return "auto" if text == "auto" else None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"exposure must be 'auto', 'model' or a mean brightness in "
            f"[{EXPOSURE_RANGE[0]}, {EXPOSURE_RANGE[1]}], got {text!r}"
        ) from None
    check_options(1.0, 0.0, value)
    return value


def check_options(strength: float, denoise: float, exposure) -> None:
    """ValueError naming the bad option; the CLI and the service check the same way."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if not 0.0 <= float(denoise) <= MAX_DENOISE:  # also refuses NaN
        raise ValueError(f"denoise must be in [0, {MAX_DENOISE:g}], got {denoise}")
    if exposure is None or exposure == "auto":
        return
    lo, hi = EXPOSURE_RANGE
    if isinstance(exposure, (str, bool)) or not lo <= float(exposure) <= hi:
        raise ValueError(
            f"exposure must be 'auto', None (the model's level) or a mean "
            f"brightness in [{lo}, {hi}], got {exposure!r}"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for, but PyTorch sees no CUDA GPU "
            "(is this the CPU build of torch?)"
        )
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


class Enhancer:
    """EFE + RIE on one device, inference only, run by one backend (model/backends/):
    `backend` is a name there or "auto" (numba on the CPU, Triton on CUDA, torch ops where
    neither runs); `self.backend` names the one in use, `self.engine` is it.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device, *, backend: str = "auto"):
        self.checkpoint = checkpoint
        self.device = device
        self.scale_factor = checkpoint.scale_factor
        assert checkpoint.efe is not None  # set in Checkpoint.__post_init__
        self.efe = EFE.from_config(checkpoint.efe)
        self.efe.load_state_dict(checkpoint.state_dict)
        self.efe.eval().requires_grad_(False).to(device)
        self.engine = backends.build(backend, self.efe, device, self.scale_factor, checkpoint.steps)
        self.backend = self.engine.name
        self.denoise_config = DenoiseConfig()

    @property
    def steps(self) -> int:
        """RIE's step count, the checkpoint's; set (tests run other counts), the backend runs
        it too (onnxruntime excepted: its graph is exported with the count)."""
        return self.engine.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.engine.steps = int(value)

    @property
    def sha256(self) -> str:
        return self.checkpoint.sha256

    @torch.inference_mode()
    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        """x_r at EFE's resolution: (N, 3, h, w) float32, h ~ H / scale_factor."""
        check_images(images)
        return self.engine.factor_lowres(images.to(self.device))

    @torch.inference_mode()
    def factor(self, images: torch.Tensor) -> torch.Tensor:
        """The enhancement factor map x_r: uint8 (N,3,H,W) -> float32 (N,3,H,W) in [-1, 1]."""
        r_low = self.factor_lowres(images)
        return upsample_factor(r_low, tuple(images.shape[-2:]))

    @torch.inference_mode()
    def enhance(
        self,
        images: torch.Tensor,
        strength: float = 1.0,
        return_factor: bool = False,
        *,
        denoise: float = DENOISE,
        exposure: float | str | None = "auto",
    ):
        """uint8 (N,3,H,W) -> uint8 (N,3,H,W), on the enhancer's device.

        `strength` in [0, 1] scales the factor map (1 = the model, 0 = identity). `denoise`
        removes the noise the curve amplified (0 = off, 1 = default, up to 4 = stronger;
        model/denoise.py). `exposure`: "auto" brightens images the model leaves darker than
        mean 0.40 up to it, a number in [0.05, 0.95] is the mean brightness to reach, None keeps
        the model's own level (model/exposure.py). With `denoise=0, exposure=None` the output
        is the paper's EFE + RIE alone. With `return_factor`, also returns the low-resolution
        factor map as applied (see `factor_lowres`); `upsample_factor(r_low, (H, W))` gives
        the full-size map.
        """
        check_options(strength, denoise, exposure)
        r_low = self.expose(images, self.factor_lowres(images), exposure)
        if strength != 1.0:
            r_low = r_low * float(strength)
        out = self.apply_factor(images, r_low, denoise)
        return (out, r_low) if return_factor else out

    @torch.inference_mode()
    def expose(
        self, images: torch.Tensor, r_low: torch.Tensor, exposure: float | str | None
    ) -> torch.Tensor:
        """The factor map shifted to the asked exposure (see `enhance`)."""
        if exposure is None:
            return r_low
        auto = exposure == "auto"
        if auto:
            return apply_exposure(
                images, r_low, AUTO_EXPOSURE, self.steps, floor=True, max_lift=AUTO_MAX_LIFT
            )
        return apply_exposure(images, r_low, float(exposure), self.steps)

    @torch.inference_mode()
    def apply_factor(
        self, images: torch.Tensor, r_low: torch.Tensor, denoise: float = 0.0
    ) -> torch.Tensor:
        """Upsample x_r, run the RIE steps and round to uint8, then denoise (strength
        `denoise`, 0 = off): the full-resolution part."""
        check_images(images)
        return self.engine.apply_factor(
            images.to(self.device), r_low, float(denoise), self.denoise_config
        )

    def warmup(self) -> float:
        """Compile (or load from numba's or Triton's on-disk cache) the backend's kernels and
        initialise the backend (cuDNN, CUDA context) on a few tiny batches, so that the first
        request does not pay for it. Returns the seconds taken; call once at service start."""
        start = time.perf_counter()
        for n, h, w in ((1, 37, 53), (2, 24, 24)):  # one image and a batch: both code paths
            images = torch.zeros(n, 3, h, w, dtype=torch.uint8)
            for denoise in (0.0, DENOISE):
                self.enhance(images, strength=0.5, denoise=denoise)
                # decoded images come channels-last (DecodedImage.to_tensor): its own kernels
                self.enhance(
                    images.to(memory_format=torch.channels_last), strength=0.5, denoise=denoise
                )
        from .video import VideoEnhancer  # video's temporal kernels: two frames of one stream

        VideoEnhancer(self).process(torch.zeros(2, 3, 37, 53, dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def load_model(
    checkpoint: str | Path | None = None,
    *,
    backend: str = "auto",
    device: str | torch.device | None = None,
    fast: bool | None = None,
) -> Enhancer:
    """Load EFE+RIE for inference.

    checkpoint: a path to our checkpoint format or a published raw state dict; None loads the
    project's own default checkpoint. backend: "auto" (the fastest one for the device: numba
    on the CPU, triton on CUDA, torch where neither runs), or one of "eager" (the reference),
    "torch", "numba", "triton", "onnxruntime" (model/backends/; `model.backends.
    available_backends(device)` says which run here). device: None picks cuda when available,
    else cpu. An unknown backend, or one that cannot run on the device, is a ValueError that
    names the ones that can. fast: deprecated; fast=False means backend="eager".
    """
    backend = _deprecated_fast(fast, backend)
    if checkpoint is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise CheckpointError(
                f"the default checkpoint {DEFAULT_CHECKPOINT} is not in this build yet; "
                "pass checkpoint=PATH (or --checkpoint PATH) to one you trained with `sgz train`"
            )
        checkpoint = DEFAULT_CHECKPOINT
    return Enhancer(load_checkpoint(checkpoint), resolve_device(device), backend=backend)


def _deprecated_fast(fast: bool | None, backend: str) -> str:
    """The backend the old `fast` flag asks for, with a DeprecationWarning; ValueError where it
    contradicts `backend` (fast=False with a fused backend was once silently the eager one)."""
    if fast is None:
        return backend
    warnings.warn(
        "load_model(fast=...) is deprecated: use backend='eager' for the reference, "
        "backend='auto' (the default) for the fastest one",
        DeprecationWarning,
        stacklevel=3,
    )
    if fast or backend == "eager":
        return backend
    if backend != backends.AUTO:
        raise ValueError(f"fast=False (the eager reference) contradicts backend={backend!r}")
    return "eager"
