"""`sgz enhance --ray`: the real command on a local Ray instance, real sice-real photos, a real
video and bad files, against plain `sgz enhance` on the same folder with the same options.
Ray's start-up (seconds) is paid twice in all: by the command in a subprocess, then by a rerun
in this process that checks resuming and file:// URIs together."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SGZ_PUBLISHED, SICE
from PIL import Image
from video_files import make_video, read_video

from model.cli import main as sgz_main

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

OPTIONS = [
    "--checkpoint",
    SGZ_PUBLISHED,
    "--format",
    "webp",
    "--quality",
    "85",
    "--denoise",
    "0.5",
    "--exposure",
    "0.45",
    "--no-temporal",
]
BAD = {"notes.jpg", "broken.jpg"}
# output (relative to OUTDIR) of each good input: sgz enhance's naming rules
EXPECTED = {
    "101_0_.webp",
    "dup.png.webp",
    "dup.jpg.webp",
    "nested/portrait.webp",
    "nested/gray.webp",
    "clip.mp4",
}


def sgz(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("sgz")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "model.cli"]
    return subprocess.run(
        cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout
    )


def crop(name: str, box) -> Image.Image:
    return Image.open(SICE / name).convert("RGB").crop(box)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Small real photos (so the model's time stays small), a video, and two bad files."""
    root = tmp_path_factory.mktemp("photos") / "my photos"  # a space: URIs and paths agree
    root.mkdir()
    shutil.copy(SICE / "101_0_.png", root / "101_0_.png")  # 512x512
    crop("893_0_.png", (0, 0, 160, 120)).save(root / "dup.png")  # same stem:
    crop("893_1_.png", (0, 0, 150, 100)).save(root / "dup.jpg", quality=95)  # names keep suffix
    (root / "nested").mkdir()
    crop("474_0_.png", (0, 0, 180, 320)).save(root / "nested" / "portrait.jpg", quality=92)
    crop("761_0_.png", (0, 0, 200, 150)).convert("L").save(root / "nested" / "gray.png")
    crop("11_0_.png", (0, 0, 64, 64)).save(root / ".hidden.png")
    make_video(root / "clip.mp4", width=96, height=64, frames=8)
    (root / "notes.jpg").write_text("lux readings, not a picture\n" * 40)
    buf = io.BytesIO()
    crop("147_0_.png", (0, 0, 400, 300)).save(buf, "JPEG", quality=90)
    (root / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def plain(photos, tmp_path_factory) -> Path:
    """What plain `sgz enhance` writes for the same folder and options (in this process)."""
    out = tmp_path_factory.mktemp("plain") / "out"
    assert sgz_main(["enhance", str(photos), "-o", str(out), *map(str, OPTIONS)]) == 1
    return out


@pytest.fixture(scope="module")
def ray_run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "out"
    return sgz("enhance", photos, "-o", out, *OPTIONS, "--ray"), out


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_command_writes_what_plain_enhance_writes_and_reports_bad_files(ray_run, plain):
    result, out = ray_run
    assert result.returncode == 1, result.stderr  # some inputs failed: sgz enhance's policy
    for name in BAD:
        assert f"{name}: " in result.stderr
    assert "6 file(s) written" in result.stderr and "2 failed" in result.stderr
    assert files_under(out) == files_under(plain) == EXPECTED
    for name in EXPECTED - {"clip.mp4"}:
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    ours, theirs = read_video(out / "clip.mp4"), read_video(plain / "clip.mp4")
    assert ours.frames.shape == (8, 64, 96, 3)
    assert np.array_equal(ours.frames, theirs.frames) and ours.stamps == theirs.stamps


def test_a_rerun_on_file_uris_skips_what_is_written_without_reading_it(
    ray_run, plain, photos, capfd
):
    _, out = ray_run
    stamps = {n: (out / n).stat().st_mtime_ns for n in EXPECTED}
    (out / "dup.jpg.webp").unlink()  # a resumed job writes only what is missing
    victim = photos / "nested" / "gray.png"  # were it read again, it would now fail to decode
    saved = victim.read_bytes()
    victim.write_text("not an image any more")
    try:  # in this process: Ray started and stopped by `run` itself
        status = sgz_main(
            ["enhance", photos.as_uri(), "-o", out.as_uri(), *map(str, OPTIONS), "--ray"]
        )
    finally:
        victim.write_bytes(saved)
    err = capfd.readouterr().err
    assert status == 1, err  # the two bad files still fail
    assert "1 file(s) written" in err and "5 skipped" in err and "2 failed" in err, err
    assert "gray.png" not in err and "broken.jpg: " in err and "notes.jpg: " in err
    assert files_under(out) == EXPECTED
    assert (out / "dup.jpg.webp").read_bytes() == (plain / "dup.jpg.webp").read_bytes()
    del stamps["dup.jpg.webp"]
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps


def test_usage_errors_exit_2(tmp_path, capfd):
    assert sgz_main(["enhance", "file:///nowhere", "-o", str(tmp_path)]) == 2
    assert "only with --ray" in capfd.readouterr().err
    assert (
        sgz_main(["enhance", str(tmp_path), "-o", str(tmp_path / "o"), "--ray=not an address"]) == 2
    )
    assert "--ray ADDRESS must be" in capfd.readouterr().err


def test_plain_enhance_does_not_import_ray(tmp_path):
    code = (
        "import sys; from model.cli import main; "
        f"main(['enhance', {str(tmp_path)!r}, '-o', {str(tmp_path / 'o')!r}]); "
        "print('ray' in sys.modules, 'pyarrow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
