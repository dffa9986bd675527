"""The denoising stage and the exposure target (model/denoise.py, model/kernels_dn.py,
model/exposure.py): every backend against the eager reference, on real dark photos."""

import numpy as np
import pytest
import torch
from conftest import LOL, SICE

from model import load_model
from model.denoise import DenoiseConfig, noise_sigma
from model.enhancer import check_options, parse_exposure
from model.imageio import decode_image


def photo(path) -> torch.Tensor:
    return decode_image(path.read_bytes()).to_tensor()  # (1, 3, H, W) channels-last


@pytest.fixture(scope="module")
def numba_enhancer():
    return load_model(backend="numba")


@pytest.fixture(scope="module")
def eager_enhancer():
    return load_model(backend="eager")


def immerkaer(images: torch.Tensor) -> float:
    return float(noise_sigma(images.contiguous(), 2)[0]) * 255


def max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


@pytest.mark.parametrize("layout", ["channels_last", "planar"])
def test_numba_matches_the_eager_reference_within_one_level(numba_enhancer, eager_enhancer, layout):
    for path in (LOL / "low" / "14.png", SICE / "147_0_.png"):
        x = photo(path)
        x = x if layout == "channels_last" else x.contiguous()
        for denoise in (1.0, 3.0):
            ref = eager_enhancer.enhance(x, denoise=denoise)
            out = numba_enhancer.enhance(x, denoise=denoise)
            assert out.shape == x.shape
            assert max_diff(out, ref) <= 1, (path.name, denoise)
            assert (out != ref).float().mean() < 0.01  # rounding ties, not a different filter


def test_torch_backend_matches_the_eager_reference(eager_enhancer):
    torch_enhancer = load_model(backend="torch")
    x = photo(LOL / "low" / "116.png")
    assert max_diff(torch_enhancer.enhance(x), eager_enhancer.enhance(x)) <= 1


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 3), (5, 7), (37, 53), (63, 131), (399, 17)])
def test_any_size_and_batches(numba_enhancer, eager_enhancer, size):
    """Sizes that are not multiples of a cell, too small for the noise estimate, and a batch of
    two different photos (each image its own noise and gain)."""
    h, w = size
    a = photo(LOL / "low" / "14.png")[..., :h, :w]
    b = photo(LOL / "low" / "106.png")[..., 1 : 1 + h, 60 : 60 + w]
    batch = torch.cat([a.contiguous(), b.contiguous()])
    out = numba_enhancer.enhance(batch)
    assert out.shape == batch.shape
    assert max_diff(out, eager_enhancer.enhance(batch)) <= 1
    for i, single in enumerate((a, b)):  # batching does not change an image's answer
        assert max_diff(out[i : i + 1], numba_enhancer.enhance(single.contiguous())) <= 1


def test_off_is_exactly_the_networks_output(numba_enhancer, eager_enhancer):
    """denoise=0, exposure=None: EFE + RIE alone, as before this stage existed."""
    x = photo(LOL / "low" / "14.png")
    plain = numba_enhancer.apply_factor(x, numba_enhancer.factor_lowres(x))
    assert torch.equal(numba_enhancer.enhance(x, denoise=0, exposure=None), plain)
    assert max_diff(eager_enhancer.enhance(x, denoise=0, exposure=None), plain) <= 1


def test_dark_noisy_photo_is_cleaned_and_structure_kept(numba_enhancer):
    """A LOL input (sensor noise amplified ~10x by the curve): the output's noise falls by more
    than half, its mean brightness stays, and its edges stay (the gradient energy of a
    strongly blurred copy would fall far more)."""
    x = photo(LOL / "low" / "14.png")
    noisy = numba_enhancer.enhance(x, denoise=0, exposure=None)
    clean = numba_enhancer.enhance(x, exposure=None)
    assert immerkaer(clean) < 0.5 * immerkaer(noisy)
    assert abs(clean.float().mean() - noisy.float().mean()) < 1.0
    blurred = torch.nn.functional.avg_pool2d(noisy.float(), 9, 1, 4)

    def grad(t):
        return float((t.float()[..., 1:] - t.float()[..., :-1]).abs().mean())

    assert grad(clean) > 1.5 * grad(blurred)


def test_clean_photo_is_barely_touched(numba_enhancer):
    """A well-exposed, nearly noise-free photo (a real one, averaged 4x4 and brightened): the
    curve hardly lifts it, so there is little to remove: denoising moves it by a fraction of a
    grey level on average."""
    rgb = decode_image((SICE / "435_0_.png").read_bytes()).rgb.astype(np.float32)
    H, W = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    small = rgb[:H, :W].reshape(H // 4, 4, W // 4, 4, 3).mean((1, 3))
    x = torch.from_numpy(np.clip(small * 2.2, 0, 255).round().astype(np.uint8))
    x = x.permute(2, 0, 1)[None]
    plain = numba_enhancer.enhance(x, denoise=0, exposure=None)
    assert float(plain.float().mean()) / 255 > 0.45
    change = (numba_enhancer.enhance(x, exposure=None).float() - plain.float()).abs()
    assert float(change.mean()) < 0.75


def test_strength_follows_the_input_noise(numba_enhancer):
    """The same photo with more sensor noise added gets smoothed more: what denoising removes
    grows with the noise, so the outputs' noise stays close."""
    x = photo(SICE / "474_0_.png")[..., :400, :600].contiguous()
    g = torch.Generator().manual_seed(0)
    noisy = (x.float() + 4 * torch.randn(x.shape, generator=g)).clamp(0, 255).round()
    noisy = noisy.to(torch.uint8)
    removed = []
    for img in (x, noisy):
        off = numba_enhancer.enhance(img, denoise=0, exposure=None)
        on = numba_enhancer.enhance(img, exposure=None)
        removed.append(float((on.float() - off.float()).abs().mean()))
    assert removed[1] > 2 * removed[0]


def test_more_denoise_is_smoother(numba_enhancer):
    x = photo(LOL / "low" / "106.png")
    noise = [immerkaer(numba_enhancer.enhance(x, denoise=d)) for d in (0, 0.5, 1, 4)]
    assert noise == sorted(noise, reverse=True)


@pytest.mark.parametrize("target", [0.25, 0.4, 0.6])
def test_exposure_reaches_the_target(numba_enhancer, target):
    for path in (LOL / "low" / "14.png", SICE / "132_0_.png", SICE / "1021_0_.png"):
        out = numba_enhancer.enhance(photo(path), exposure=target)
        assert abs(float(out.float().mean()) / 255 - target) < 0.03, path.name


def test_auto_exposure_lifts_dark_photos_and_leaves_bright_ones(numba_enhancer):
    dark = photo(LOL / "low" / "14.png")
    model_level = numba_enhancer.enhance(dark, exposure=None).float().mean() / 255
    auto = numba_enhancer.enhance(dark).float().mean() / 255
    assert model_level < 0.37 and abs(auto - 0.40) < 0.03
    bright = photo(SICE / "1021_0_.png")[..., :300, :300].contiguous()
    bright = (bright.float() * 1.6).clamp(0, 255).to(torch.uint8)  # the model leaves it > 0.4
    assert numba_enhancer.enhance(bright, exposure=None).float().mean() / 255 > 0.42
    assert torch.equal(
        numba_enhancer.enhance(bright), numba_enhancer.enhance(bright, exposure=None)
    )


def test_bad_options_are_refused_with_their_name():
    for kwargs, word in (
        ({"denoise": -0.1}, "denoise"),
        ({"denoise": 4.5}, "denoise"),
        ({"denoise": float("nan")}, "denoise"),
        ({"exposure": 0.0}, "exposure"),
        ({"exposure": 1.2}, "exposure"),
        ({"exposure": "bright"}, "exposure"),
        ({"exposure": True}, "exposure"),
    ):
        opts = {"strength": 1.0, "denoise": 1.0, "exposure": "auto", **kwargs}
        with pytest.raises(ValueError, match=word):
            check_options(**opts)
    assert parse_exposure("model") is None and parse_exposure(" AUTO ") == "auto"
    assert parse_exposure("0.5") == 0.5
    for bad in ("", "nan", "0.99", "-1", "bright"):
        with pytest.raises(ValueError, match="exposure"):
            parse_exposure(bad)


def test_config_refuses_odd_cells():
    with pytest.raises(ValueError, match="cell"):
        DenoiseConfig(cell=3)


def test_lol_figures_improve_with_denoising(numba_enhancer):
    """On a handful of LOL pairs: the default (denoise + exposure) beats the network alone on
    PSNR and SSIM for every one (the full set: docs/model-card.md)."""
    skimage = pytest.importorskip("skimage.metrics")
    for name in ("14.png", "116.png", "106.png", "124.png"):
        x, gt = photo(LOL / "low" / name), decode_image((LOL / "high" / name).read_bytes()).rgb
        scores = []
        for kwargs in ({"denoise": 0, "exposure": None}, {}):
            out = numba_enhancer.enhance(x, **kwargs)[0].permute(1, 2, 0).numpy()
            mse = np.mean((out.astype(float) - gt) ** 2)
            scores.append(
                (
                    10 * np.log10(255**2 / mse),
                    skimage.structural_similarity(out, gt, channel_axis=2, data_range=255),
                )
            )
        assert scores[1][0] > scores[0][0] and scores[1][1] > scores[0][1] + 0.05, name


@pytest.mark.parametrize("cell", [6, 8])
def test_other_cell_sizes_match_the_reference(cell):
    """DenoiseConfig(cell=...) reaches every path: the numba kernels' general code (not the
    4-pixel fast paths) against the eager reference."""
    x = photo(LOL / "low" / "106.png")
    fast, eager = load_model(backend="numba"), load_model(backend="eager")
    fast.denoise_config = eager.denoise_config = DenoiseConfig(cell=cell)
    assert max_diff(fast.enhance(x), eager.enhance(x)) <= 1


def test_strength_zero_is_still_the_input(numba_enhancer, eager_enhancer):
    """With strength 0 the curve has slope 1 everywhere, so it added no noise: the default
    denoising leaves the input exactly as it was, in every path."""
    x = photo(LOL / "low" / "14.png")
    for enhancer in (numba_enhancer, eager_enhancer):
        assert torch.equal(enhancer.enhance(x, strength=0.0), x)
        assert torch.equal(enhancer.enhance(x.contiguous(), strength=0.0, denoise=4), x)
