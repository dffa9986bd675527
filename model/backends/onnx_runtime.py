"""`backend="onnxruntime"` (CPU): the enhancer's two halves exported to ONNX in memory
(model/export.py) and run by ONNX Runtime.

For checking and benchmarking the exported graph through the same API as the other backends:
the network half (images -> x_r low-res) and the full-size half ((images, x_r) -> uint8) are
separate sessions, so exposure and strength apply to x_r between them as on every backend, and
denoising runs after, in the torch reference (model/denoise.py). Needs the `onnx` extra.
"""

import importlib.util

import numpy as np
import torch

from ..denoise import DenoiseConfig
from ..denoise import denoise as denoise_reference
from ..efe import EFE
from .base import NO_DENOISE, Availability, Backend, check_factor


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        from ..export import EXTRA_HINT

        raise ImportError(f"the onnxruntime backend needs ONNX Runtime: {EXTRA_HINT}") from None
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """Inputs: uint8 (N, 3, H, W) CPU tensors."""

    name = "onnxruntime"

    @classmethod
    def available(cls, device: torch.device) -> Availability:
        missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed (the onnx extra)")
        if device.type != "cpu":
            return Availability(False, "the onnxruntime backend runs on the CPU only")
        return Availability(True)

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        super().__init__(efe, scale_factor, steps)
        ort = _onnxruntime()
        from ..export import export_parts, require_onnx

        require_onnx()
        lowres, apply = export_parts(efe, scale_factor, steps)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # one thread knob, as numba's
        cpu = ["CPUExecutionProvider"]
        self.lowres = ort.InferenceSession(lowres, options, providers=cpu)
        self.apply = ort.InferenceSession(apply, options, providers=cpu)

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.numpy())
        return torch.from_numpy(self.lowres.run(None, {"images": x})[0])

    def apply_factor(
        self,
        images: torch.Tensor,
        r_low: torch.Tensor,
        denoise: float = 0.0,
        config: DenoiseConfig = NO_DENOISE,
    ) -> torch.Tensor:
        check_factor(images, r_low)
        x = np.ascontiguousarray(images.numpy())
        r = r_low.detach().to("cpu", torch.float32).expand(images.shape[0], -1, -1, -1)
        out = torch.from_numpy(
            self.apply.run(None, {"images": x, "factor_lowres": np.ascontiguousarray(r.numpy())})[0]
        )
        if denoise > 0:
            out = denoise_reference(images, out, r_low, denoise, config, self.steps)
        return out
