"""`sgz enhance` end to end: the real console script in a subprocess, the real published model,
real sice-real photos mixed with files that are not images."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SGZ_PUBLISHED, SICE
from PIL import Image

from model import DEFAULT_CHECKPOINT
from model.imageio import decode_image, factor_to_picture
from model.rie import upsample_factor


def sgz(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("sgz")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "model.cli"]
    return subprocess.run(
        cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout
    )


def real(name: str, box=None) -> Image.Image:
    img = Image.open(SICE / name).convert("RGB")
    return img.crop(box) if box else img


def as_tensor(path: Path) -> torch.Tensor:
    return decode_image(path.read_bytes()).to_tensor()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder as a user has it: photos of several sizes and kinds, plus junk."""
    root = tmp_path_factory.mktemp("photos")
    shutil.copy(SICE / "101_0_.png", root / "101_0_.png")  # 512x512
    shutil.copy(SICE / "512_0_.png", root / "512_0_.png")  # 3840x2160
    real("761_0_.png", (0, 0, 300, 200)).convert("L").save(root / "gray.png")
    rgba = real("474_0_.png", (300, 700, 620, 940))
    alpha = np.tile(np.linspace(0, 255, 320).astype(np.uint8), (240, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "rgba.png")
    real("893_0_.png", (0, 0, 120, 90)).save(root / "dup.png")
    real("893_1_.png", (0, 0, 130, 80)).save(root / "dup.jpg", quality=95)
    (root / "notes.txt").write_text("lux readings, not a picture\n" * 40)
    buf = io.BytesIO()
    real("147_0_.png").save(buf, "JPEG", quality=90)
    (root / "broken.jpg").write_bytes(buf.getvalue()[: buf.tell() // 2])
    real("11_0_.png", (0, 0, 64, 64)).save(root / ".hidden.png")
    (root / "nested" / "deeper").mkdir(parents=True)
    real("101_0_.png", (10, 20, 343, 271)).save(root / "nested" / "101_0_.png")  # same stem
    real("474_0_.png", (0, 0, 270, 480)).save(
        root / "nested" / "deeper" / "portrait.jpg", quality=92
    )
    return root


# output (relative to OUTDIR, without suffix) -> source (relative to the input folder)
EXPECTED = {
    "101_0_": "101_0_.png",
    "512_0_": "512_0_.png",
    "gray": "gray.png",
    "rgba": "rgba.png",
    "dup.png": "dup.png",
    "dup.jpg": "dup.jpg",
    "nested/101_0_": "nested/101_0_.png",
    "nested/deeper/portrait": "nested/deeper/portrait.jpg",
}


@pytest.fixture(scope="module")
def png_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = sgz(
        "enhance",
        inputs,
        "-o",
        out / "enhanced",
        "--checkpoint",
        SGZ_PUBLISHED,
        "--factor-dir",
        out / "factors",
    )
    return result, out / "enhanced", out / "factors"


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_bad_files_are_reported_by_name_and_the_exit_code_says_so(png_run):
    result, _, _ = png_run
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert any("notes.txt" in line and "not an image" in line for line in lines), result.stderr
    assert any("broken.jpg" in line and "truncated" in line for line in lines), result.stderr
    assert "8 file(s) written" in result.stderr and "2 input(s) failed" in result.stderr
    assert "10/10" in result.stderr  # the progress bar counted every candidate file


def test_valid_images_are_written_with_their_input_sizes(png_run, inputs):
    _, enhanced, _ = png_run
    assert files_under(enhanced) == {name + ".png" for name in EXPECTED}
    for name, source in EXPECTED.items():
        out = Image.open(enhanced / f"{name}.png")
        assert out.format == "PNG"
        assert out.size == decode_image((inputs / source).read_bytes()).size, name
    assert Image.open(enhanced / "512_0_.png").size == (3840, 2160)


def test_outputs_are_the_models_output(png_run, inputs, published_enhancer):
    _, enhanced, _ = png_run
    for name in ("101_0_", "nested/101_0_", "nested/deeper/portrait"):
        expected = published_enhancer.enhance(as_tensor(inputs / EXPECTED[name]))
        assert torch.equal(as_tensor(enhanced / f"{name}.png"), expected), name
    dark = as_tensor(inputs / "101_0_.png").float().mean()
    assert as_tensor(enhanced / "101_0_.png").float().mean() > dark + 20


def test_grayscale_stays_gray_and_alpha_is_untouched(png_run, inputs):
    _, enhanced, _ = png_run
    gray = Image.open(enhanced / "gray.png")
    assert gray.mode == "L"
    assert np.asarray(gray).mean() > np.asarray(Image.open(inputs / "gray.png")).mean()
    rgba = Image.open(enhanced / "rgba.png")
    assert rgba.mode == "RGBA"
    assert np.array_equal(
        np.asarray(rgba.getchannel("A")),
        np.asarray(Image.open(inputs / "rgba.png").getchannel("A")),
    )


def test_factor_dir_holds_one_factor_picture_per_image(png_run, inputs, published_enhancer):
    _, enhanced, factors = png_run
    assert files_under(factors) == files_under(enhanced)
    images = as_tensor(inputs / "101_0_.png")
    _, r_low = published_enhancer.enhance(images, return_factor=True)  # the map as applied
    expected = factor_to_picture(upsample_factor(r_low, images.shape[-2:])[0]).astype(int)
    picture = np.asarray(Image.open(factors / "101_0_.png"))
    assert picture.shape == expected.shape
    assert np.abs(picture.astype(int) - expected).max() <= 1
    assert picture.std() > 1, "a flat factor picture"
    assert Image.open(factors / "512_0_.png").size == (3840, 2160)


def test_jpeg_output_from_several_inputs_one_missing(inputs, tmp_path):
    out = tmp_path / "jpeg"
    result = sgz(
        "enhance",
        inputs / "gray.png",
        tmp_path / "nope.png",
        inputs / "rgba.png",
        inputs / "nested",
        "-o",
        out,
        "--format",
        "jpeg",
        "--quality",
        "85",
        "--checkpoint",
        SGZ_PUBLISHED,
    )
    assert result.returncode == 1
    assert f"{tmp_path / 'nope.png'}: no such file or directory" in result.stderr
    # several INPUTs: files land in OUTDIR, a folder keeps its name
    assert files_under(out) == {
        "gray.jpeg",
        "rgba.jpeg",
        "nested/101_0_.jpeg",
        "nested/deeper/portrait.jpeg",
    }
    for name in files_under(out):
        assert Image.open(out / name).format == "JPEG"
    assert Image.open(out / "gray.jpeg").mode == "L"
    assert Image.open(out / "rgba.jpeg").mode == "RGB"  # JPEG holds no alpha
    assert Image.open(out / "nested/deeper/portrait.jpeg").size == (270, 480)


def test_webp_output_keeps_alpha(inputs, tmp_path):
    out = tmp_path / "webp"
    result = sgz(
        "enhance",
        inputs / "rgba.png",
        inputs / "dup.jpg",
        "-o",
        out,
        "--format",
        "webp",
        "--checkpoint",
        SGZ_PUBLISHED,
    )
    assert result.returncode == 0, result.stderr
    assert files_under(out) == {"rgba.webp", "dup.webp"}
    webp = Image.open(out / "rgba.webp")
    assert webp.format == "WEBP" and webp.mode == "RGBA" and webp.size == (320, 240)
    assert np.array_equal(
        np.asarray(webp.getchannel("A")),
        np.asarray(Image.open(inputs / "rgba.png").getchannel("A")),
    )


def test_output_folder_inside_the_input_is_not_walked(tmp_path):
    photos = tmp_path / "photos"
    (photos / "enhanced").mkdir(parents=True)
    real("761_0_.png", (0, 0, 96, 64)).save(photos / "a.png")
    real("761_0_.png", (0, 0, 96, 64)).save(photos / "enhanced" / "a.png")  # an earlier run's
    result = sgz("enhance", photos, "-o", photos / "enhanced", "--checkpoint", SGZ_PUBLISHED)
    assert result.returncode == 0, result.stderr
    assert "1 file(s) written" in result.stderr
    assert files_under(photos) == {"a.png", "enhanced/a.png"}


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_checkpoint_is_a_clear_error_with_exit_code_2(inputs, tmp_path, kind):
    checkpoint = tmp_path / "model.pth"
    if kind == "corrupt":
        checkpoint.write_bytes(SGZ_PUBLISHED.read_bytes()[:20_000])
    result = sgz("enhance", inputs / "gray.png", "-o", tmp_path / "out", "--checkpoint", checkpoint)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    expected = "no such file" if kind == "missing" else "corrupt, truncated"
    assert f"checkpoint {checkpoint}: " in result.stderr and expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_default_checkpoint(inputs, tmp_path):
    result = sgz("enhance", inputs / "gray.png", "-o", tmp_path / "out")
    assert "Traceback" not in result.stderr
    assert DEFAULT_CHECKPOINT.is_file()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "gray.png").is_file()


def test_denoise_and_exposure_options(tmp_path, published_enhancer):
    """--denoise 0 --exposure model is the network alone; --exposure 0.5 reaches it; bad values
    are usage errors (exit 2) that name the option."""
    source = SICE / "101_0_.png"
    for name, args, options in (
        ("plain", ["--denoise", "0", "--exposure", "model"], {"denoise": 0, "exposure": None}),
        ("bright", ["--denoise", "2", "--exposure", "0.5"], {"denoise": 2, "exposure": 0.5}),
    ):
        result = sgz("enhance", source, "-o", tmp_path / name, "--checkpoint", SGZ_PUBLISHED, *args)
        assert result.returncode == 0, result.stderr
        got = as_tensor(tmp_path / name / "101_0_.png")
        assert torch.equal(got, published_enhancer.enhance(as_tensor(source), **options))
    for args, word in (
        (["--denoise", "9"], "denoise"),
        (["--denoise", "x"], "denoise"),
        (["--exposure", "bright"], "exposure"),
        (["--exposure", "1.2"], "exposure"),
    ):
        result = sgz("enhance", source, "-o", tmp_path / "bad", *args)
        assert result.returncode == 2 and word in result.stderr, result.stderr
        assert not (tmp_path / "bad").exists()
