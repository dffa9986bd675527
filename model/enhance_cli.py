"""`sgz enhance`: brighten image and video files and folders through the model API.

Images stream one at a time: a reader thread decodes the next image while the model enhances
the current one and a writer thread encodes the previous one, with at most a few images in
flight, so memory stays bounded whatever the folder size. Folders are walked lazily, one
directory listing at a time.
"""

import argparse
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import ray_enhance, video_cli
from .checkpoint import CheckpointError
from .enhance_options import add_quality_options
from .enhance_options import quality as _quality
from .enhancer import load_model
from .imageio import (
    FORMATS,
    IMAGE_SUFFIXES,
    DecodedImage,
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    encode_image,
    factor_to_picture,
    tensor_to_rgb,
)
from .rie import upsample_factor

IN_FLIGHT = 2  # images decoded ahead of the model, and encoded behind it
EXIT_FAILED_FILES = 1
EXIT_USAGE = 2

EPILOG = (
    """\
outputs: a file INPUT is written as OUTDIR/<stem>.<format>; the images of a folder INPUT keep
their subfolders under OUTDIR. With several INPUTs, each folder gets its own OUTDIR/<folder
name>/. Two images of one folder sharing a stem (a.jpg, a.png) keep their extension in the name
(a.jpg.png, a.png.png). Hidden files and folders are skipped; any other file that is not a
readable image is reported and the exit status is 1.

"""
    + video_cli.VIDEO_HELP
    + """
exit status: 0 all written, 1 some inputs failed (listed on stderr), 2 bad usage or checkpoint.
"""
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "enhance",
        help="enhance image and video files and folders",
        description="Brighten low-light images and videos with SGZ (EFE + RIE).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        type=ray_enhance.path_or_uri,
        help="image and video files and folders (walked recursively)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=ray_enhance.path_or_uri,
        metavar="OUTDIR",
        help="folder for the enhanced images and videos (created if missing)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="an sgz-serve checkpoint or a published raw state dict "
        "(default: the project's own checkpoint)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--format",
        choices=("png", "jpeg", "webp"),
        default="png",
        help="output format (default png; jpeg drops alpha)",
    )
    p.add_argument(
        "--quality",
        type=_quality,
        default=90,
        metavar="1-100",
        help="jpeg / webp quality (default 90)",
    )
    p.add_argument(
        "--factor-dir",
        type=ray_enhance.path_or_uri,
        default=None,
        metavar="DIR",
        help="also write each factor map x_r as a picture (darker = lower factor)",
    )
    add_quality_options(p)
    video_cli.add_video_options(p)
    ray_enhance.add_options(p)
    p.set_defaults(func=run)


@dataclass
class Job:
    source: Path
    name: Path  # output path relative to OUTDIR, without the format's suffix
    error: str | None = None


def iter_jobs(
    inputs: list[Path], skip: set[str], on_error: Callable[[OSError], None] | None = None
) -> Iterator[Job]:
    """One Job per file to enhance, in INPUT order; folders walked lazily, each sorted."""
    files = [i for i, p in enumerate(inputs) if not p.is_dir()]
    folders = [i for i, p in enumerate(inputs) if p.is_dir()]
    names = dict(zip(files, _file_names([inputs[i] for i in files])))
    names.update(zip(folders, _dedupe([inputs[i].resolve().name or "root" for i in folders])))
    for i, p in enumerate(inputs):
        if p.is_dir() and os.path.realpath(p) in skip:
            yield Job(p, Path(), error="is the output folder; give another -o / --factor-dir")
        elif p.is_dir():
            base = Path(names[i]) if len(inputs) > 1 else Path()
            yield from _walk(p, base, skip, on_error)
        elif p.is_file():
            yield Job(p, Path(names[i]))
        else:
            reason = "not a regular file" if p.exists() else "no such file or directory"
            yield Job(p, Path(), error=reason)


def _walk(
    root: Path, base: Path, skip: set[str], on_error: Callable[[OSError], None] | None
) -> Iterator[Job]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(here / d) not in skip
        )
        # isfile: regular files only; reading a FIFO or a device would hang or never end
        paths = [
            here / f
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.isfile(here / f)
        ]
        rel = base / here.relative_to(root)
        for path, name in zip(paths, _file_names(paths)):
            yield Job(path, rel / name)


def _file_names(paths: list[Path]) -> list[str]:
    """Output names (without suffix) for files written side by side: the stem, or the full
    name when two images or videos share a stem."""
    media = IMAGE_SUFFIXES | video_cli.VIDEO_SUFFIXES
    stems = Counter(p.stem for p in paths if p.suffix.lower() in media)
    return _dedupe(
        [p.name if stems[p.stem] > 1 and p.suffix.lower() in media else p.stem for p in paths]
    )


def _dedupe(names: list[str]) -> list[str]:
    """name, name-2, name-3, ... for names still equal (the same file or folder given twice)."""
    seen: Counter[str] = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def prefetch(
    pool: ThreadPoolExecutor, items: Iterable, fn: Callable, depth: int = IN_FLIGHT
) -> Iterator[tuple]:
    """(item, fn(item)) in order, with up to `depth` calls running ahead in `pool`."""
    queue: deque[tuple] = deque()
    for item in items:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) > depth:
            item0, fut = queue.popleft()
            yield item0, fut.result()
    while queue:
        item0, fut = queue.popleft()
        yield item0, fut.result()


VIDEO = "video"  # what `read` answers for a video: it streams from the file instead


def read(job: Job) -> DecodedImage | str:
    """The decoded image, VIDEO, or the reason it cannot be enhanced."""
    if job.error:
        return job.error
    if video_cli.is_video_file(job.source):
        return VIDEO
    try:
        return decode_image(job.source.read_bytes())
    except (ImageDecodeError, ImageTooLarge) as e:
        return str(e)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"


def write(path: Path, encode: Callable[[], bytes]) -> str | None:
    """Encode and write atomically (no half-written file after a crash); the error, if any."""
    try:
        data = encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
    except (OSError, ValueError) as e:
        return f"cannot write {path}: {getattr(e, 'strerror', None) or e}"
    return None


class Run:
    """State of one `sgz enhance` call: the model, the output settings and the tally."""

    def __init__(self, args, enhancer, bar: tqdm):
        self.enhancer, self.bar, self.args = enhancer, bar, args
        self.outdir, self.factor_dir = args.output, args.factor_dir
        self.fmt, self.quality = FORMATS[args.format], args.quality
        self.options = {"denoise": args.denoise, "exposure": args.exposure}
        self.suffix = "." + args.format
        self.written = self.failed = 0
        self.first_failed: list[str] = []  # for the summary; each failure is reported as it comes

    def fail(self, source: Path, reason: str) -> None:
        self.failed += 1
        if len(self.first_failed) < 10:
            self.first_failed.append(str(source))
        tqdm.write(f"sgz enhance: {source}: {reason}", file=sys.stderr)

    def enhance(self, job: Job, image: DecodedImage) -> list[tuple[Path, Callable]]:
        """Run the model; return the (path, encode) pairs the writer thread should finish."""
        images = image.to_tensor()
        if self.factor_dir is None:
            out = self.enhancer.enhance(images, **self.options)
        else:
            out, r_low = self.enhancer.enhance(images, return_factor=True, **self.options)
        rgb = tensor_to_rgb(out)
        writes = [
            (
                self.outdir / (str(job.name) + self.suffix),
                lambda: encode_image(rgb, image.alpha, image.gray, self.fmt, self.quality),
            )
        ]
        if self.factor_dir is not None:
            picture = factor_to_picture(upsample_factor(r_low, tuple(images.shape[-2:]))[0])
            writes.append(
                (
                    self.factor_dir / (str(job.name) + self.suffix),
                    lambda: encode_image(picture, None, False, self.fmt, self.quality),
                )
            )
        return writes

    def summary(self, seconds: float, inputs: list[Path]) -> int:
        """Print the outcome; return the exit status."""
        if self.written == 0 and self.failed == 0:
            print(
                f"sgz enhance: no image or video found in {', '.join(map(str, inputs))}",
                file=sys.stderr,
            )
            return EXIT_FAILED_FILES
        line = (
            f"sgz enhance: {self.written} file(s) written to {self.outdir} "
            f"in {seconds:.1f} s on {self.enhancer.device}"
        )
        if self.failed:
            more = f" and {self.failed - 10} more" if self.failed > 10 else ""
            line += f"; {self.failed} input(s) failed: {', '.join(self.first_failed)}{more}"
        print(line, file=sys.stderr)
        return EXIT_FAILED_FILES if self.failed else 0

    def video(self, job: Job) -> None:
        dst = video_cli.output_path(self.outdir, job.name, job.source, self.args.codec)
        error = video_cli.enhance_file(self.enhancer, job.source, dst, self.args, self.options)
        if error:
            self.fail(job.source, error)
        else:
            self.written += 1
        self.bar.update(1)

    def finish(self, job: Job, futures: list[Future]) -> None:
        errors = [e for e in (f.result() for f in futures) if e]
        if errors:
            self.fail(job.source, "; ".join(errors))
        else:
            self.written += 1
        self.bar.update(1)

    def process(self, jobs: Iterable[Job]) -> None:
        pending: deque[tuple[Job, list[Future]]] = deque()
        with (
            ThreadPoolExecutor(1, "sgz-read") as reader,
            ThreadPoolExecutor(1, "sgz-write") as writer,
        ):
            for job, image in prefetch(reader, jobs, read):
                if image is VIDEO:
                    self.video(job)
                    continue
                if isinstance(image, str):
                    self.fail(job.source, image)
                    self.bar.update(1)
                    continue
                try:
                    writes = self.enhance(job, image)
                except (RuntimeError, MemoryError) as e:  # out of memory on a huge image
                    self.fail(job.source, f"enhance failed: {e}")
                    self.bar.update(1)
                    continue
                pending.append((job, [writer.submit(write, p, enc) for p, enc in writes]))
                while len(pending) > IN_FLIGHT:
                    self.finish(*pending.popleft())
            while pending:
                self.finish(*pending.popleft())


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.ray is not None or ray_enhance.has_uri(args):  # URIs: a usage error without --ray
        return ray_enhance.run(args)
    try:
        video_cli.encoder_options(args)
    except ValueError as e:
        print(f"sgz enhance: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        enhancer = load_model(args.checkpoint, device=args.device)
    except (CheckpointError, ValueError) as e:
        print(f"sgz enhance: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        if args.factor_dir is not None:
            args.factor_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"sgz enhance: error: cannot create output folder: {e}", file=sys.stderr)
        return EXIT_USAGE
    # never walk into our own output, e.g. `sgz enhance photos -o photos/enhanced`
    skip = {os.path.realpath(d) for d in (args.output, args.factor_dir) if d is not None}
    total = sum(1 for _ in iter_jobs(args.inputs, skip))
    walk_errors: list[OSError] = []
    with tqdm(total=total, unit="file", desc="enhance", file=sys.stderr, dynamic_ncols=True) as bar:
        state = Run(args, enhancer, bar)
        try:
            state.process(iter_jobs(args.inputs, skip, on_error=walk_errors.append))
        except KeyboardInterrupt:
            bar.close()
            print("sgz enhance: interrupted", file=sys.stderr)
            return 130
    for err in walk_errors:
        state.fail(Path(err.filename or "?"), f"cannot list folder: {err.strerror or err}")
    return state.summary(time.perf_counter() - start, args.inputs)
