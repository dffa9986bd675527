"""The triton backend's kernels (model/triton_kernels.py) against the eager reference.

Without a GPU the kernel runs in Triton's interpreter: this file re-runs itself in a child
process with TRITON_INTERPRET=1 (it must be set before the kernel is defined), on real photo
crops small enough for the interpreter. With a GPU the same comparisons run on CUDA, at full
photo sizes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, when run as a script
from conftest import SGZ_PUBLISHED, SICE  # noqa: E402

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (the `test` extra has it)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def photo(name: str) -> torch.Tensor:
    with Image.open(SICE / name) as im:
        hwc = np.asarray(im.convert("RGB")).copy()
    return torch.from_numpy(hwc).permute(2, 0, 1)[None].contiguous()


def layouts(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Planar and channels-last (what `DecodedImage.to_tensor` gives) copies of a batch."""
    return {
        "planar": image.contiguous(),
        "channels_last": image.contiguous(memory_format=torch.channels_last),
    }


def compare(device: str, cases: dict[str, torch.Tensor], steps: int = 8) -> dict:
    """Per case: the largest difference in grey levels between the Triton path and the eager
    reference (on the CPU), the share of values that differ, and whether the answer kept the
    input's layout."""
    from model import load_model
    from model.backends.triton_fused import TritonBackend
    from model.denoise import DenoiseConfig

    eager = load_model(SGZ_PUBLISHED, backend="eager", device="cpu")
    eager.steps = steps
    triton_path = TritonBackend(eager.efe, eager.scale_factor, steps)
    out = {}
    for name, image in cases.items():
        for strength in (1.0, 0.3):
            r = eager.factor_lowres(image) * strength
            want = eager.apply_factor(image, r)
            for layout, x in layouts(image).items():
                got = triton_path.apply_factor(x.to(device), r.to(device)).cpu()
                diff = (got.int() - want.int()).abs()
                out[f"{name} s={strength} {layout}"] = {
                    "max": diff.max().item(),
                    "share": (diff > 0).float().mean().item(),
                    "same_layout": got.stride() == x.stride(),
                    "shape_ok": got.shape == image.shape and got.dtype == torch.uint8,
                }
                if strength == 1.0:  # the denoising stage after the kernel (torch ops)
                    want_dn = eager.apply_factor(image, r, 1.0)
                    got = triton_path.apply_factor(
                        x.to(device), r.to(device), 1.0, DenoiseConfig()
                    ).cpu()
                    diff = (got.int() - want_dn.int()).abs()
                    out[f"{name} denoise {layout}"] = {
                        "max": diff.max().item(),
                        "share": (diff > 0).float().mean().item(),
                        "same_layout": True,
                        "shape_ok": got.shape == image.shape,
                    }
        # one map for the whole batch (the service's factor store never does it; the API may)
        if image.shape[0] > 1:
            r = eager.factor_lowres(image[:1])
            want = eager.apply_factor(image, r)
            got = triton_path.apply_factor(image.to(device), r.to(device)).cpu()
            out[f"{name} one map"] = {
                "max": (got.int() - want.int()).abs().max().item(),
                "share": 0.0,
                "same_layout": True,
                "shape_ok": True,
            }
    return out


def interpreter_cases() -> dict[str, torch.Tensor]:
    img = photo("101_0_.png")
    return {
        "41x57 crop": img[:, :, 100:141, 200:257],
        "1x1": img[:, :, :1, :1],
        "2x700 strip": img[:, :, 300:302, :].repeat(1, 1, 1, 2)[..., :700],
        "batch of 2": torch.cat([img[:, :, :23, :31], img[:, :, 200:223, 300:331]]),
    }


def assert_close(results: dict) -> None:
    for case, r in results.items():
        assert r["shape_ok"], case
        assert r["same_layout"], case
        assert r["max"] <= 1, f"{case}: {r['max']} grey levels apart"
        assert r["share"] < 2e-3, f"{case}: {r['share']:.2%} of values differ"


@needs_triton
@pytest.mark.slow
def test_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    # cases x strengths x layouts, cases x layouts denoised, one map, 3 steps
    assert len(results) == 4 * 2 * 2 + 4 * 2 + 1 + 1
    assert_close(results)


@needs_cuda
@needs_triton
def test_cuda_default_is_triton_and_matches_reference():
    from model import load_model

    gpu = load_model(SGZ_PUBLISHED, device="cuda")
    assert gpu.backend == "triton"
    eager = load_model(SGZ_PUBLISHED, backend="eager", device="cpu")
    for name in ("101_0_.png", "435_0_.png"):
        image = photo(name)
        for layout, x in layouts(image).items():
            net = {"denoise": 0, "exposure": None}  # the network alone: within one level
            got, r_gpu = gpu.enhance(x, return_factor=True, **net)
            want, r_cpu = eager.enhance(image, return_factor=True, **net)
            assert got.is_cuda and got.shape == image.shape
            torch.testing.assert_close(r_gpu.cpu(), r_cpu, atol=2e-3, rtol=0)
            diff = (got.cpu().int() - want.int()).abs()
            assert diff.max().item() <= 1, (name, layout)
            # the default: cuDNN's map (2e-3 off) moves the exposure offset a little too
            diff = (gpu.enhance(x).cpu().int() - eager.enhance(image).int()).abs()
            assert diff.max().item() <= 2 and (diff > 1).float().mean() < 0.01, (name, layout)


@needs_cuda
@needs_triton
def test_cuda_kernel_at_full_size():
    img = photo("435_0_.png")
    batch = torch.cat([img, img.flip(-1)])
    assert_close(compare("cuda", {"1920x1080 pair": batch, "odd 999x1001": img[:, :, :999, :1001]}))


if __name__ == "__main__":  # the child of test_kernel_matches_reference_in_interpreter
    results = compare("cpu", interpreter_cases())
    img = photo("101_0_.png")[:, :, 50:70, 60:90]
    results.update(
        {
            f"{k} steps=3": v
            for k, v in compare("cpu", {"20x30": img}, steps=3).items()
            if k.startswith("20x30 s=1.0 planar")
        }
    )
    print(json.dumps(results))
