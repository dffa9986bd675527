"""The inference backends behind `load_model(backend=...)`, one module each, one interface
(model/backends/base.py: `available(device)`, `factor_lowres`, `apply_factor`):

    eager        the reference, plain PyTorch as the published code (any device)
    torch        the fused formulation in torch ops (any device)
    numba        numba kernels (CPU)
    triton       a Triton kernel for the full-size pass (CUDA)
    onnxruntime  the exported ONNX graph under ONNX Runtime (CPU; the onnx extra)

"auto" picks numba on the CPU and triton on CUDA, torch where neither runs. Backend modules
are imported only when asked for: `import model` imports neither numba nor triton.
"""

import importlib
import logging

import torch

from .base import Availability, Backend, channels_last, check_factor  # noqa: F401

log = logging.getLogger("sgz.model")

# name -> (module, class): imported on first use
_REGISTRY = {
    "eager": ("eager", "EagerBackend"),
    "torch": ("torch_fused", "TorchBackend"),
    "numba": ("numba_fused", "NumbaBackend"),
    "triton": ("triton_fused", "TritonBackend"),
    "onnxruntime": ("onnx_runtime", "OnnxRuntimeBackend"),
}
NAMES = tuple(_REGISTRY)
AUTO = "auto"


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name`; ValueError naming the known ones if there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}: one of {', '.join((AUTO, *NAMES))}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def available_backends(device: str | torch.device = "cpu") -> dict[str, Availability]:
    """Every registered backend's availability on `device` (with the reason when not)."""
    device = torch.device(device)
    return {name: backend_class(name).available(device) for name in NAMES}


def get_backend(name: str, device: str | torch.device) -> type[Backend]:
    """The backend class to run on `device`: `name` one of NAMES or "auto". ValueError for an
    unknown name, and for one that cannot run on this machine or device (saying why, and
    which ones do run there): both are a bad choice of the caller's, as a bad device is."""
    device = torch.device(device)
    if name == AUTO:
        return choose(device)
    cls = backend_class(name)
    availability = cls.available(device)
    if not availability:
        usable = [n for n, a in available_backends(device).items() if a]
        raise ValueError(
            f"backend {name!r} is not available on {device.type}: "
            f"{availability.reason}; available there: {', '.join(usable)}"
        )
    return cls


def choose(device: torch.device) -> type[Backend]:
    """The "auto" backend for the device: numba on the CPU, triton on CUDA, else torch. Triton
    builds a small C launcher at its first kernel launch on a GPU: without a C compiler that
    launch fails, so the torch backend runs instead, with a warning, rather than a service that
    never becomes ready."""
    if device.type == "cpu" and backend_class("numba").available(device):
        return backend_class("numba")
    if device.type == "cuda" and backend_class("triton").available(device):
        from .triton_fused import c_compiler

        if c_compiler() is not None:
            return backend_class("triton")
        log.warning(
            "no C compiler (gcc, clang or $CC) for Triton's launcher: the CUDA path "
            "runs in torch ops instead (slower); install gcc to use the Triton kernel"
        )
    return backend_class("torch")


def build(name: str, efe, device: torch.device, scale_factor: float, steps: int) -> Backend:
    """An instance of `get_backend(name, device)` for this EFE."""
    return get_backend(name, device)(efe, scale_factor, steps)
