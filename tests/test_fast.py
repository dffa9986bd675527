"""The fused backends (model/backends/: numba, torch) against the eager reference, on real photos
and the published checkpoint: every output pixel within 1 grey level, and almost all of them
identical."""

import importlib.util
import threading

import numpy as np
import pytest
import torch
from conftest import SGZ_PUBLISHED, SICE
from PIL import Image

from model import EFE, Checkpoint, Enhancer, load_model
from model.backends import channels_last, choose, get_backend
from model.backends.numba_fused import NumbaBackend, downscaled_mean
from model.backends.torch_fused import TorchBackend
from model.backends.triton_fused import TritonBackend
from model.resample import efe_input, lowres_size, taps, upsample_factor
from model.rie import rie, to_uint8

NET = {"denoise": 0, "exposure": None}  # EFE + RIE alone: the paper's network


@pytest.fixture(scope="module")
def fast():
    enhancer = load_model(SGZ_PUBLISHED, device="cpu")
    enhancer.warmup()
    return enhancer


@pytest.fixture(scope="module")
def eager():
    return load_model(SGZ_PUBLISHED, backend="eager", device="cpu")


def photo(name: str) -> torch.Tensor:
    with Image.open(SICE / name) as im:
        hwc = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
        return hwc.permute(2, 0, 1)[None].contiguous()


def wide_photo() -> torch.Tensor:
    """The first 1920x1080 photo."""
    for f in sorted(SICE.glob("*.png")):
        with Image.open(f) as im:
            if im.size == (1920, 1080):
                return photo(f.name)
    pytest.fail("no 1920x1080 photo in sice-real")


def assert_close(got: torch.Tensor, want: torch.Tensor, share: float = 1e-3) -> None:
    assert got.dtype == torch.uint8 and got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert diff.max().item() <= 1, f"{diff.max().item()} grey levels apart"
    # float summation order may flip a rounding, not shift the picture
    assert (diff > 0).float().mean().item() < share


def test_default_is_numba_and_eager_selectable(fast, eager):
    assert fast.backend == "numba" and isinstance(fast.engine, NumbaBackend)
    assert eager.backend == "eager"


def test_real_photos_match_reference(fast, eager):
    for image in (photo("101_0_.png"), wide_photo()):
        out, r_fast = fast.enhance(image, return_factor=True)
        ref, r_eager = eager.enhance(image, return_factor=True)
        assert_close(out, ref)
        assert r_fast.shape == r_eager.shape
        torch.testing.assert_close(r_fast, r_eager, atol=1e-5, rtol=0)
        assert not torch.equal(out, image)  # the model did brighten it


@pytest.mark.parametrize(
    "size", [(1, 1), (13, 7), (4001, 3), (2, 3000), (12, 12), (25, 37), (900, 1200)]
)
def test_odd_sizes_match_reference(fast, eager, size):
    h, w = size
    big = wide_photo()
    if h > big.shape[2] or w > big.shape[3]:  # 4001 rows: stack the photo's columns
        image = big[:, :, :, :w].repeat(1, 1, -(-h // big.shape[2]), 1)[:, :, :h].contiguous()
    else:
        image = big[:, :, 100 : 100 + h, 200 : 200 + w].contiguous()
    assert_close(fast.enhance(image), eager.enhance(image))
    assert fast.factor_lowres(image).shape == eager.factor_lowres(image).shape


def test_single_image_bands_are_exact():
    """One image's EFE runs as two overlapping bands on two threads; the halo makes the seam
    exact, so the factor map equals the one-thread (unsplit) computation bit for bit. Dense
    random weights: a trained EFE's dead channels can hide a too-small halo."""
    efe = EFE()
    efe.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    for m in efe.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    enhancer = Enhancer(Checkpoint(state_dict=efe.state_dict()), torch.device("cpu"))
    image = wide_photo()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = enhancer.factor_lowres(image)
        torch.set_num_threads(1)
        whole = enhancer.factor_lowres(image)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, whole)


def test_batch_of_one_size(fast, eager):
    names = ["101_0_.png", "101_1_.png", "1021_2_.png"]
    batch = torch.cat([photo(n)[:, :, :300, :401] for n in names])
    out = fast.enhance(batch)
    assert_close(out, eager.enhance(batch))
    for i in range(len(names)):  # batching does not mix images
        assert torch.equal(out[i : i + 1], fast.enhance(batch[i : i + 1].contiguous()))


def test_strength_scales_the_factor(fast, eager):
    image = photo("11_0_.png")
    assert torch.equal(fast.enhance(image, strength=0.0, **NET), image)
    for s in (0.3, 0.75):
        assert_close(fast.enhance(image, strength=s), eager.enhance(image, strength=s))


def test_apply_factor_broadcasts_and_checks_shape(fast, eager):
    batch = torch.cat([photo("101_0_.png"), photo("101_1_.png")])
    r_low = fast.factor_lowres(batch[:1])
    assert_close(fast.apply_factor(batch, r_low), eager.apply_factor(batch, r_low))
    with pytest.raises(ValueError, match="factor map"):
        fast.apply_factor(batch, r_low[:, :2])
    with pytest.raises(TypeError, match="uint8"):
        fast.enhance(batch.float())


def test_non_contiguous_input(fast):
    image = photo("101_0_.png")[:, :, 50:250]  # rows cut: neither layout is contiguous
    assert not image.is_contiguous() and not channels_last(image)
    assert torch.equal(fast.enhance(image), fast.enhance(image.contiguous()))


@pytest.mark.parametrize("size", [(1, 1), (13, 7), (300, 401), (1080, 1920)])
def test_channels_last_is_read_and_answered_as_such(fast, size):
    """Decoded images come channels-last (a view of the decoded array): the kernels read that
    layout directly and answer in it, with the same values as for a contiguous copy."""
    h, w = size
    batch = torch.cat([wide_photo()[:, :, :h, :w], wide_photo()[:, :, -h:, -w:]])
    for images in (batch[:1], batch):
        hwc = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert channels_last(hwc) and (h * w == 1 or not hwc.is_contiguous())
        out, r_low = fast.enhance(hwc, return_factor=True)
        want, r_want = fast.enhance(images.contiguous(), return_factor=True)
        assert torch.equal(out, want) and torch.equal(r_low, r_want)
        assert channels_last(out)
        half = fast.enhance(hwc, strength=0.5)
        assert torch.equal(half, fast.enhance(images.contiguous(), strength=0.5))


def test_concurrent_callers_get_their_own_results(fast):
    images = [photo(n) for n in ("101_0_.png", "101_1_.png", "101_2_.png", "101_3_.png")]
    want = [fast.enhance(im) for im in images]
    got, errors = [None] * len(images), []

    def run(i):
        try:
            for _ in range(3):
                got[i] = fast.enhance(images[i])
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_torch_path_matches_reference(eager):
    """The torch backend is what CUDA runs without Triton; its logic is checked here on CPU."""
    path = TorchBackend(eager.efe, eager.scale_factor, eager.steps)
    image = wide_photo()[:, :, :601, :1203].contiguous()
    with torch.inference_mode():
        r_low = path.factor_lowres(image)
        torch.testing.assert_close(r_low, eager.factor_lowres(image), atol=1e-5, rtol=0)
        assert torch.equal(path.apply_factor(image, r_low), eager.apply_factor(image, r_low))
        hwc = image.to(memory_format=torch.channels_last)
        assert torch.equal(path.apply_factor(hwc, r_low), eager.apply_factor(image, r_low))


@pytest.mark.parametrize("steps", [3, 8])
def test_any_step_count_matches_reference(eager, steps):
    """The RIE kernel unrolls the paper's 8 steps; other counts take the general loop."""
    path = NumbaBackend(eager.efe, eager.scale_factor, steps)
    image = photo("761_0_.png")
    with torch.inference_mode():
        r_low = eager.factor_lowres(image)
        x = image.float().div(255)
        want = to_uint8(rie(x, upsample_factor(r_low, tuple(image.shape[-2:])), steps))
        assert_close(path.apply_factor(image, r_low), want)
        hwc = image.to(memory_format=torch.channels_last)  # the channels-last kernel's loops
        assert torch.equal(path.apply_factor(hwc, r_low), path.apply_factor(image, r_low))


def test_backend_can_be_forced_and_is_checked(eager):
    image = wide_photo()[:, :, :90, :120].contiguous()
    torch_ops = load_model(SGZ_PUBLISHED, backend="torch", device="cpu")
    assert torch_ops.backend == "torch"
    assert_close(torch_ops.enhance(image), eager.enhance(image))
    assert load_model(SGZ_PUBLISHED, backend="numba", device="cpu").backend == "numba"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        load_model(SGZ_PUBLISHED, backend="nope", device="cpu")
    with pytest.raises(ValueError, match="CPU only"):
        get_backend("numba", torch.device("cuda"))


def test_cuda_without_a_c_compiler_falls_back_to_torch_with_a_warning(
    monkeypatch, tmp_path, caplog
):
    """Triton compiles a C launcher at its first launch on a GPU: with no compiler the default
    CUDA path is the torch one (and says so), never a Triton path that fails at warm-up."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    cuda = torch.device("cuda")  # only chosen for, never run on
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no cc, gcc or clang
    with caplog.at_level("WARNING", logger="sgz.model"):
        assert choose(cuda) is TorchBackend
    assert "no C compiler" in caplog.text
    monkeypatch.setenv("CC", "/usr/bin/gcc")
    assert choose(cuda) is TritonBackend
    assert choose(torch.device("cpu")) is NumbaBackend


def test_warmup_reports_seconds(fast):
    seconds = fast.warmup()
    assert 0 < seconds < 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_torch_ops_match_cpu_reference(eager):
    """The plain torch-ops path on CUDA (the default there is the Triton kernel:
    tests/test_triton.py)."""
    gpu = load_model(SGZ_PUBLISHED, backend="torch", device="cuda")
    assert gpu.backend == "torch"
    image = wide_photo()
    # cuDNN's convolutions sum in TF32 and CUDA fuses multiply-adds throughout the 35
    # elementwise passes: on an H200, 0.74% of the values were one level off (never more)
    assert_close(gpu.enhance(image).cpu(), eager.enhance(image), share=2e-2)


def test_near_dead_weights_are_flushed(eager):
    """The published checkpoint's e_conv3-5 hold denormal weights; the kernels get zeros there
    (kernels.TINY), so no product falls into x86's slow denormal path. The outputs stay within
    1 grey level of the eager path that keeps them (test_real_photos_match_reference)."""
    from model.kernels import TINY

    weights = torch.cat([p.detach().abs().flatten() for p in eager.efe.parameters()])
    assert ((weights > 0) & (weights < 1.2e-38)).any()  # what makes this test meaningful
    path = NumbaBackend(eager.efe, eager.scale_factor, eager.steps)
    for group in path.weights:
        for t in group:
            assert not ((t != 0) & (np.abs(t) < TINY)).any()


@pytest.mark.parametrize("layout", ["planar", "channels-last"])
def test_level_gain_mean_is_the_efe_inputs_mean(layout):
    """The numba backend takes the level gain's brightness from the source rows and columns the
    downscale reads (`downscaled_mean`) instead of building EFE's input: the same mean."""
    images = torch.cat([photo("101_0_.png"), photo("761_0_.png")])[:, :, :333, :497].contiguous()
    if layout == "channels-last":
        images = images.to(memory_format=torch.channels_last)
    h, w = lowres_size(333, 497, 12)
    got = downscaled_mean(images.numpy(), taps(333, h, False), taps(497, w, False))
    want = efe_input(images, 12).mean((1, 2, 3))
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-6, rtol=0)


def test_vectorised_tanh_is_within_4e_7_of_tanh():
    """EFE's last activation in the numba kernels is a rational fit, not libm's scalar tanhf:
    within 4e-7 of tanh (in float64) everywhere, odd, 0 at 0 and never outside [-1, 1]."""
    from model.kernels import _tanh

    x = np.concatenate([np.linspace(-30, 30, 600_001), [0.0, 1e-30, -1e-30, 8.99, 9.01]])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    _tanh(x, got, len(x))
    assert np.abs(got - np.tanh(x.astype(np.float64))).max() < 4e-7
    grid = got[:-5]  # symmetric about 0
    np.testing.assert_array_equal(grid, -grid[::-1])
    assert got[-5] == 0 and np.abs(got).max() <= 1
