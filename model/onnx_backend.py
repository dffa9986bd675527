"""`load_model(..., backend="onnxruntime")`: the enhancer's two halves exported to ONNX in
memory (model/export.py) and run by ONNX Runtime on the CPU.

For checking and benchmarking the exported graph through the same API as the other backends
(model/fast.py): the network half (images -> x_r low-res) and the full-size half ((images,
x_r) -> uint8) are separate sessions, so exposure and strength apply to x_r between them as
on every backend, and denoising runs after, in the torch reference (model/denoise.py).
Optional: needs the `onnx` extra.
"""
import numpy as np
import torch

from .denoise import DenoiseConfig, denoise as denoise_reference
from .efe import EFE
from .fast import NO_DENOISE, check_factor


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        from .export import EXTRA_HINT
        raise ImportError(f"the onnxruntime backend needs ONNX Runtime: {EXTRA_HINT}") from None
    return onnxruntime


class OnnxRuntimeFast:
    """CPU: ONNX Runtime sessions of the exported halves. Inputs: uint8 (N, 3, H, W)."""
    name = "onnxruntime"

    @staticmethod
    def available() -> bool:
        try:
            _onnxruntime()
            import onnx  # noqa: F401  (the exporter's metadata step)
        except ImportError:
            return False
        return True

    @classmethod
    def on(cls, device: torch.device, efe: EFE, scale_factor: float, steps: int):
        if device.type != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU only")
        return cls(efe, scale_factor, steps)

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        ort = _onnxruntime()
        from .export import export_parts, require_onnx
        require_onnx()
        self.scale_factor, self.steps = scale_factor, steps
        lowres, apply = export_parts(efe, scale_factor, steps)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # one thread knob, as numba's
        cpu = ["CPUExecutionProvider"]
        self.lowres = ort.InferenceSession(lowres, options, providers=cpu)
        self.apply = ort.InferenceSession(apply, options, providers=cpu)

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.numpy())
        return torch.from_numpy(self.lowres.run(None, {"images": x})[0])

    def apply_factor(self, images: torch.Tensor, r_low: torch.Tensor, denoise: float = 0.0,
                     config: DenoiseConfig = NO_DENOISE) -> torch.Tensor:
        check_factor(images, r_low)
        x = np.ascontiguousarray(images.numpy())
        r = r_low.detach().to("cpu", torch.float32).expand(images.shape[0], -1, -1, -1)
        out = torch.from_numpy(self.apply.run(
            None, {"images": x, "factor_lowres": np.ascontiguousarray(r.numpy())})[0])
        if denoise > 0:
            out = denoise_reference(images, out, r_low, denoise, config, self.steps)
        return out

