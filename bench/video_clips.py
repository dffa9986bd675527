"""Synthetic test and benchmark clips from a real photo: a smooth camera pan and zoom over it,
made dark the way a cheap camera at night sees a scene, encoded as H.264 (yuv420p) MP4.

The darkening follows the recipe of the shared data's video (shared/data/video/README.md):
sRGB -> linear (^2.2), times a per-frame exposure k_t = level (1 + flicker sin(2 pi t / 30) +
0.03 N(0, 1)) (auto-exposure pumping), Poisson shot noise (1500 photons at a linear value of
1) plus Gaussian read noise (sigma 0.004), back to sRGB, 8 bits. Everything random comes from
one generator seeded with `seed`: the same arguments give the same clip.

    python -m bench.video_clips OUT.mp4 --size 1280x720 --frames 120 [--gt OUT.npy]
"""

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image

# the one landscape photo over 720p in sice-real that is not itself dark (mean 0.23; the
# others are SICE's under-exposed shots, mean 0.003-0.05, which darkening would turn black)
PHOTO = "435_0_.png"
LEVEL, FLICKER, JITTER = 0.08, 0.15, 0.03  # exposure k_t, as in shared/data/video
PHOTONS, READ_NOISE = 1500.0, 0.004
ZOOM = (1.15, 1.35)  # start and end zoom: above 1 so that the window always has room to pan
RECIPE = 1  # bump when the frames change, so that cached clips (bench_clip) are remade


def _srgb_to_linear() -> np.ndarray:
    return ((np.arange(256, dtype=np.float32) / 255) ** 2.2).astype(np.float32)


LINEAR = _srgb_to_linear()  # uint8 -> linear float32, a table: one lookup instead of a pow


def default_shared() -> Path:
    return Path(os.environ.get("SGZ_SHARED", "../shared"))


@lru_cache(maxsize=4)
def _photo(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def clean_frames(
    width: int, height: int, frames: int, *, shared: Path | None = None, photo: str = PHOTO
) -> Iterator[np.ndarray]:
    """The ground truth: (H, W, 3) uint8 frames of a camera moving over the photo, left to
    right with a slow vertical drift while zooming in from ZOOM[0] to ZOOM[1]. The window is
    placed with sub-pixel precision (PIL's resize box), so the motion is smooth."""
    im = _photo((shared or default_shared()) / "data" / "sice-real" / photo)
    pw, ph = im.size
    # the largest window of the output's aspect ratio inside the photo, before zooming
    bw, bh = (pw, pw * height / width) if pw * height <= ph * width else (ph * width / height, ph)
    for t in range(frames):
        u = t / max(frames - 1, 1)
        e = 0.5 - 0.5 * np.cos(np.pi * u)  # ease in and out: no jerk at either end
        zoom = ZOOM[0] + (ZOOM[1] - ZOOM[0]) * e
        ww, wh = bw / zoom, bh / zoom
        # offsets within the slack the zoom leaves, so the window never leaves the photo
        cx = pw / 2 + (e - 0.5) * (bw - ww)
        cy = ph / 2 + 0.5 * np.sin(2 * np.pi * u) * (bh - wh) / 2
        box = (cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2)
        yield np.asarray(im.resize((width, height), Image.Resampling.BILINEAR, box=box))


def darken(
    frame: np.ndarray,
    t: int,
    rng: np.random.Generator,
    level: float = LEVEL,
    flicker: float = FLICKER,
) -> np.ndarray:
    """One frame of the recipe in the module docstring; frame t of the clip (the flicker's
    phase). Draws from `rng` in a fixed order (exposure, shot noise, read noise)."""
    k = level * (1 + flicker * np.sin(2 * np.pi * t / 30) + JITTER * rng.standard_normal())
    lam = LINEAR[frame] * np.float32(k * PHOTONS)
    e = rng.poisson(lam).astype(np.float32) * np.float32(1 / PHOTONS)
    e += rng.standard_normal(e.shape, dtype=np.float32) * np.float32(READ_NOISE)
    np.clip(e, 0, 1, out=e)
    return (np.power(e, np.float32(1 / 2.2)) * 255 + 0.5).astype(np.uint8)


def make_clip(
    path,
    width: int,
    height: int,
    frames: int,
    fps: float = 30,
    dark: bool = True,
    seed: int = 0,
    *,
    shared: Path | None = None,
    photo: str = PHOTO,
    gt=None,
    crf: int = 18,
    preset: str = "medium",
    level: float = LEVEL,
    flicker: float = FLICKER,
) -> Path:
    """Write the clip to `path` (H.264 yuv420p MP4 at `fps`, CRF `crf`): the clean frames
    (clean_frames), made dark (darken) unless `dark=False`. `gt`: also save the clean frames
    there as .npy, (T, H, W, 3) uint8, written frame by frame (a 1080p clip of 120 frames is
    750 MB: never held in memory). Width and height must be even (yuv420p)."""
    if width % 2 or height % 2 or width <= 0 or height <= 0 or frames <= 0:
        raise ValueError(f"bad clip {width}x{height}, {frames} frames: even sizes, frames > 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = None
    if gt is not None:
        truth = np.lib.format.open_memmap(
            gt, mode="w+", dtype=np.uint8, shape=(frames, height, width, 3)
        )
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part.mp4")  # a cache never sees half a clip
    with av.open(str(tmp), "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"crf": str(crf), "preset": preset}
        for t, frame in enumerate(clean_frames(width, height, frames, shared=shared, photo=photo)):
            if truth is not None:
                truth[t] = frame
            low = darken(frame, t, rng, level, flicker) if dark else frame
            out.mux(st.encode(av.VideoFrame.from_ndarray(low, format="rgb24")))
        out.mux(st.encode(None))
    if truth is not None:
        truth.flush()
        del truth
    tmp.replace(path)
    return path


def bench_clip(
    width: int, height: int, frames: int, shared: Path | None = None, cache: Path | None = None
) -> Path:
    """The benchmark's dark clip, made once and kept in the temp dir (1080p takes a minute
    on two cores); the name holds every argument, so a different clip gets its own file."""
    cache = cache or Path(tempfile.gettempdir()) / "sgz-bench-clips"
    path = cache / f"dark-{width}x{height}-{frames}f-30fps-r{RECIPE}.mp4"
    if not path.is_file():
        make_clip(path, width, height, frames, 30, shared=shared)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.video_clips",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="the .mp4 to write")
    p.add_argument("--size", default="1280x720", help="WxH, both even (default 1280x720)")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--fps", type=float, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean", action="store_true", help="no darkening: the ground truth itself")
    p.add_argument("--gt", help="also write the clean frames here (.npy, T x H x W x 3 uint8)")
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--preset", default="medium", help="x264 preset (default medium)")
    p.add_argument("--level", type=float, default=LEVEL, help=f"mean exposure (default {LEVEL})")
    p.add_argument(
        "--flicker",
        type=float,
        default=FLICKER,
        help=f"exposure pumping amplitude (default {FLICKER})",
    )
    p.add_argument(
        "--shared",
        default=str(default_shared()),
        help="the shared folder with data/sice-real (default: $SGZ_SHARED or ../shared)",
    )
    p.add_argument("--photo", default=PHOTO, help=f"photo in sice-real (default {PHOTO})")
    a = p.parse_args(argv)
    try:
        w, h = (int(v) for v in a.size.lower().split("x"))
        make_clip(
            a.out,
            w,
            h,
            a.frames,
            a.fps,
            not a.clean,
            a.seed,
            shared=Path(a.shared),
            photo=a.photo,
            gt=a.gt,
            crf=a.crf,
            preset=a.preset,
            level=a.level,
            flicker=a.flicker,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"bench.video_clips: {e}", file=sys.stderr)
        return 2
    print(
        f"{a.out}: {a.frames} frames {w}x{h} at {a.fps:g} fps"
        + (f"; clean frames in {a.gt}" if a.gt else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
