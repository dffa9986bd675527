"""The backend registry (model/backends/): what it lists, the errors for a backend that is unknown
or cannot run here, every available CPU backend against the eager reference on a real photo,
the deprecated `fast=` flag, and that `import model` leaves numba (and triton) unimported."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import SGZ_PUBLISHED, SICE
from PIL import Image

from model import available_backends, load_model
from model.backends import NAMES, get_backend
from model.backends.base import Backend

NET = {"denoise": 0, "exposure": None}  # EFE + RIE alone
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def eager():
    return load_model(SGZ_PUBLISHED, backend="eager", device="cpu")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A real dark photo, cropped to odd sides (the size rule's rounding is exercised)."""
    with Image.open(SICE / "101_0_.png") as im:
        rgb = np.asarray(im.convert("RGB"))[:301, :453].copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def test_registry_lists_every_backend_with_its_availability():
    got = available_backends("cpu")
    assert list(got) == ["eager", "torch", "numba", "triton", "onnxruntime"] == list(NAMES)
    assert got["eager"] and got["torch"]  # pure PyTorch: run wherever torch does
    assert not got["triton"] and "CUDA" in got["triton"].reason  # this CPU-only test run
    for name, availability in got.items():
        assert bool(availability) != bool(availability.reason), name  # a reason only when not
    assert not available_backends("meta")["numba"]  # numba kernels need host memory
    assert (
        "CPU only" in available_backends("meta")["numba"].reason
        or "not installed" in available_backends("meta")["numba"].reason
    )


def test_unknown_backend_is_a_clear_error_naming_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown backend 'cuda-magic': one of auto, eager, "
        r"torch, numba, triton, onnxruntime",
    ):
        load_model(SGZ_PUBLISHED, backend="cuda-magic", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_triton_on_cpu_is_refused_naming_what_runs_here():
    with pytest.raises(ValueError) as e:
        load_model(SGZ_PUBLISHED, backend="triton", device="cpu")
    message = str(e.value)
    assert "backend 'triton' is not available on cpu" in message
    usable = [n for n, a in available_backends("cpu").items() if a]
    assert message.endswith(f"available there: {', '.join(usable)}")
    with pytest.raises(ValueError, match="CPU only"):
        get_backend("numba", "cuda")  # chosen for, never run on


def test_auto_on_cpu_is_numba_when_installed(eager):
    auto = load_model(SGZ_PUBLISHED, device="cpu")
    assert auto.backend == ("numba" if available_backends("cpu")["numba"] else "torch")
    assert isinstance(auto.engine, Backend) and auto.engine.name == auto.backend


@pytest.mark.parametrize("name", [n for n in NAMES if n != "eager"])
def test_every_available_cpu_backend_matches_eager(eager, image, name):
    """Each backend's two halves on a real photo: x_r within 1e-5 of the reference's (ONNX
    Runtime's convolutions: 1e-4), the network alone within 1 grey level, and almost every
    value identical; the default options (exposure, denoising) within 1 level too."""
    availability = available_backends("cpu")[name]
    if not availability:
        pytest.skip(f"{name}: {availability.reason}")
    backend = load_model(SGZ_PUBLISHED, backend=name, device="cpu")
    assert backend.backend == name
    with torch.inference_mode():
        r_got, r_want = backend.factor_lowres(image), eager.factor_lowres(image)
        assert r_got.shape == r_want.shape == (1, 3, 25, 38)  # round(301 / 12), round(453 / 12)
        atol = 1e-4 if name == "onnxruntime" else 1e-5
        torch.testing.assert_close(r_got, r_want, atol=atol, rtol=0)
        for options in (NET, {}):
            got, want = backend.enhance(image, **options), eager.enhance(image, **options)
            diff = (got.int() - want.int()).abs()
            assert got.shape == image.shape and diff.max() <= 1, (name, options)
            assert (diff > 0).float().mean() < 1e-3, (name, options)


def test_fast_flag_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="backend='eager'"):
        assert load_model(SGZ_PUBLISHED, device="cpu", fast=False).backend == "eager"
    with pytest.warns(DeprecationWarning):
        assert (
            load_model(SGZ_PUBLISHED, backend="torch", device="cpu", fast=True).backend == "torch"
        )
    # once silently the eager path: now refused
    with warnings.catch_warnings(), pytest.raises(ValueError, match="contradicts"):
        warnings.simplefilter("ignore", DeprecationWarning)
        load_model(SGZ_PUBLISHED, backend="numba", device="cpu", fast=False)
    with pytest.raises(TypeError):  # device is keyword-only: one switch, spelled out
        load_model(SGZ_PUBLISHED, "cpu")


def test_importing_model_does_not_import_numba_or_triton():
    code = (
        "import sys, model, model.video, model.export; "
        "assert 'numba' not in sys.modules, 'numba'; "
        "assert 'triton' not in sys.modules, 'triton'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
