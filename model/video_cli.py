"""The video half of `sgz enhance`: files recognised as video by their content go through
`model.video.enhance_video`, one at a time, each with its own progress bar in frames."""

import argparse
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .video import enhance_video
from .videoio import CODECS, X264_PRESETS, Cancelled, EncoderOptions, VideoError, is_video

VIDEO_HELP = """\
videos: any file FFmpeg reads as video (mp4, mov, mkv, avi, webm, ...; recognised by content,
not by suffix) is written as OUTDIR/<stem>.mp4 (.mkv for a Matroska input, which keeps every
audio and subtitle stream; .webm with --codec vp9 from a WebM input), with the same frames,
size, frame rate, timestamps and rotation, and its audio and subtitles copied. 10-bit SDR
video is enhanced and written as 8-bit; HDR (PQ / HLG) is refused.
"""


def add_video_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video")
    g.add_argument(
        "--codec",
        choices=tuple(CODECS),
        default="h264",
        help="video encoder (default h264: yuv420p, plays everywhere)",
    )
    g.add_argument(
        "--crf",
        type=int,
        default=EncoderOptions.crf,
        metavar="N",
        help=f"constant quality, lower = better and larger (default "
        f"{EncoderOptions.crf}; 0-51 for h264/hevc, 0-63 for vp9/av1)",
    )
    g.add_argument(
        "--preset",
        choices=X264_PRESETS,
        default=EncoderOptions.preset,
        help="encoder speed against size (default medium)",
    )
    g.add_argument(
        "--temporal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="temporal stability: smoothed exposure and motion-adaptive temporal "
        "denoising (default on; --no-temporal enhances each frame alone)",
    )


def encoder_options(args) -> EncoderOptions:
    """ValueError (a usage error) for a crf out of the codec's range."""
    return EncoderOptions(codec=args.codec, crf=args.crf, preset=args.preset)


# a file named so that Pillow does not identify goes the video way, to get FFmpeg's error
VIDEO_SUFFIXES = {
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".avi",
    ".webm",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".m2ts",
    ".wmv",
    ".flv",
    ".3gp",
    ".ogv",
    ".y4m",
}


def is_video_file(path: Path) -> bool:
    """A file Pillow cannot identify as an image and that FFmpeg reads as video or that is
    named as one (Pillow only identifies MPEG, it cannot decode it)."""
    try:
        with Image.open(path) as img:
            if img.format != "MPEG":
                return False
    except (UnidentifiedImageError, OSError, ValueError):
        pass
    return path.suffix.lower() in VIDEO_SUFFIXES or is_video(path)


def output_path(outdir: Path, name: Path, source: Path, codec: str) -> Path:
    suffix = source.suffix.lower()
    if suffix == ".mkv":
        ext = ".mkv"
    elif suffix == ".webm" and codec in ("vp9", "av1"):
        ext = ".webm"
    else:
        ext = ".mp4"
    return outdir / (str(name) + ext)


def enhance_file(enhancer, source: Path, dst: Path, args, options: dict) -> str | None:
    """Enhance one video with a progress bar in frames; the error, if any."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(
        unit="frame",
        desc=source.name[:24],
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        position=1,
    ) as bar:

        def progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            stats = enhance_video(
                enhancer,
                source,
                dst,
                temporal=args.temporal,
                encoder=encoder_options(args),
                progress=progress,
                **options,
            )
        except (VideoError, Cancelled) as e:
            return str(e)
        except OSError as e:
            return f"cannot write {dst}: {e.strerror or e}"
    if stats.dropped_streams:
        tqdm.write(
            f"sgz enhance: {source}: not copied (the output container cannot hold "
            f"them): {', '.join(stats.dropped_streams)}",
            file=sys.stderr,
        )
    return None
