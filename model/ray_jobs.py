"""The pieces of `sgz enhance --ray` (model/ray_enhance.py) that are not Ray's: listing inputs
through pyarrow.fs with `sgz enhance`'s output names, the resume check, the read step and the
actor that enhances. Rows are plain dicts: src (the name reported), path (in its filesystem),
place (index of its INPUT), name (the output's, without suffix), kind, size, error, data."""

import argparse
import os
import posixpath
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MAX_FILE_BYTES = 256 * 2**20  # refused unread: more than any photo Pillow's pixel limit allows
COPY_CHUNK = 8 * 2**20
BATCH = 8  # rows per actor call: decoding and encoding overlap the model within a batch
VIDEO = "video"  # Worker.decode's answer for a video: its actor streams it from the file


def is_uri(text) -> bool:
    return isinstance(text, str) and "://" in text


@dataclass
class Place:
    """A folder or file on a pyarrow filesystem: a local path or a URI."""

    fs: Any  # a pyarrow.fs.FileSystem
    path: str
    local: bool
    label: str  # as the user wrote it, for messages

    @classmethod
    def open(cls, target: Path | str) -> "Place":
        from pyarrow import fs

        if not is_uri(target):
            return cls(fs.LocalFileSystem(), os.path.abspath(target), True, str(target))
        filesystem, path = fs.FileSystem.from_uri(str(target))
        return cls(filesystem, path, isinstance(filesystem, fs.LocalFileSystem), str(target))

    def join(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if rel else self.path

    def label_of(self, rel: str) -> str:
        return self.label.rstrip("/") + "/" + rel if rel else self.label


@dataclass
class Plan:
    jobs: list[dict] = field(default_factory=list)  # to run on Ray
    failed: list[dict] = field(default_factory=list)  # known bad before reading
    skipped: int = 0  # outputs already there
    failures: list[str] = field(default_factory=list)


def plan(places: list[Place], out: Place, factor: Place | None, args) -> Plan:
    """The jobs of `sgz enhance INPUTs -o OUT`, minus those whose outputs exist (unless
    --overwrite): checked on one listing of OUT, before any input is opened."""
    from . import video_cli

    outputs = [p for p in (out, factor) if p is not None]
    existing = [set() if args.overwrite else _files(p) for p in outputs]

    def done(row: dict, kind: str) -> bool:
        if kind == "video":
            want = [
                video_cli.output_path(
                    Path(), Path(row["name"]), Path(row["path"]), args.codec
                ).as_posix()
            ]
        else:
            want = [row["name"] + "." + args.format] * len(outputs)
        return all(w in have for w, have in zip(want, existing))

    result = Plan()
    for row in _rows(places, outputs):
        if row["error"]:
            result.failed.append(row)
            continue
        # the kind its name says first: a rerun then opens no input already done
        guess = (
            "video"
            if PurePosixPath(row["path"]).suffix.lower() in video_cli.VIDEO_SUFFIXES
            else "image"
        )
        kind = guess
        if not done(row, guess) and places[row["place"]].local:  # by content, as sgz enhance
            kind = "video" if video_cli.is_video_file(Path(row["path"])) else "image"
        if done(row, kind):
            result.skipped += 1
        else:
            result.jobs.append(dict(row, kind=kind))
    return result


def _files(place: Place) -> set[str]:
    from pyarrow import fs

    selector = fs.FileSelector(place.path, recursive=True, allow_not_found=True)
    return {
        posixpath.relpath(e.path, place.path)
        for e in place.fs.get_file_info(selector)
        if e.type == fs.FileType.File
    }


def _rows(places: list[Place], outputs: list[Place]):
    """`enhance_cli.iter_jobs` over pyarrow filesystems, with its naming functions."""
    from pyarrow import fs

    from .enhance_cli import _dedupe, _file_names

    infos = [p.fs.get_file_info(p.path) for p in places]
    dirs = [i.type == fs.FileType.Directory for i in infos]
    files = [i for i, d in enumerate(dirs) if not d]
    folders = [i for i, d in enumerate(dirs) if d]
    names = dict(zip(files, _file_names([Path(places[i].path) for i in files])))
    names.update(zip(folders, _dedupe([_folder_name(places[i]) for i in folders])))
    for i, (place, info) in enumerate(zip(places, infos)):
        if dirs[i] and "" in _inside(place, outputs):
            yield _row(i, place, "", "", 0, "is the output folder; give another -o / --factor-dir")
        elif dirs[i]:
            yield from _walk(i, place, names[i] if len(places) > 1 else "", outputs)
        elif info.type == fs.FileType.File:
            yield _row(i, place, "", names[i], info.size)
        else:
            missing = info.type == fs.FileType.NotFound
            yield _row(
                i,
                place,
                "",
                "",
                0,
                "no such file or directory" if missing else "not a regular file",
            )


def _folder_name(place: Place) -> str:
    path = os.path.realpath(place.path) if place.local else place.path.rstrip("/")
    return PurePosixPath(path).name or "root"


def _inside(root: Place, outputs: list[Place]) -> list[str]:
    """Output folders inside `root`, relative to it ("" for root itself): never walked."""
    found = []
    for o in outputs:
        if type(o.fs) is not type(root.fs):
            continue
        a, b = (
            (os.path.realpath(o.path), os.path.realpath(root.path))
            if root.local
            else (o.path.rstrip("/"), root.path.rstrip("/"))
        )
        if a == b or a.startswith(b + "/"):
            found.append("" if a == b else posixpath.relpath(a, b))
    return found


def _walk(i: int, place: Place, base: str, outputs: list[Place]):
    from pyarrow import fs

    from .enhance_cli import _file_names

    skip = _inside(place, outputs)
    try:
        entries = place.fs.get_file_info(fs.FileSelector(place.path, recursive=True))
    except OSError as e:
        yield _row(i, place, "", "", 0, f"cannot list folder: {e}")
        return
    by_dir: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for info in entries:
        rel = posixpath.relpath(info.path, place.path)
        if (
            info.type != fs.FileType.File
            or any(s.startswith(".") for s in rel.split("/"))
            or any(rel.startswith(s + "/") for s in skip)
        ):
            continue
        by_dir[posixpath.dirname(rel)].append((posixpath.basename(rel), info.size))
    for d in sorted(by_dir):
        files = sorted(by_dir[d])
        for (f, size), name in zip(files, _file_names([Path(f) for f, _ in files])):
            yield _row(i, place, posixpath.join(d, f), posixpath.join(base, d, name), size)


def _row(i: int, place: Place, rel: str, name: str, size: int, error: str = "") -> dict:
    return {
        "src": place.label_of(rel),
        "path": place.join(rel),
        "place": i,
        "name": name,
        "kind": "",
        "size": int(size or 0),
        "error": error,
    }


def read_row(row: dict, places: list[Place]) -> dict:
    """Ray Data's read step: the image's bytes, or why not (a video is read by its actor)."""
    row = dict(row, data=b"")
    if row["error"] or row["kind"] == "video":
        return row
    if row["size"] > MAX_FILE_BYTES:
        row["error"] = f"too large: {row['size']} bytes (at most {MAX_FILE_BYTES} for an image)"
        return row
    try:
        with places[row["place"]].fs.open_input_stream(row["path"]) as f:
            row["data"] = f.read()
    except OSError as e:
        row["error"] = f"cannot read: {e}"
    return row


def worker_options(args) -> dict:
    keys = ("format", "quality", "denoise", "exposure", "codec", "crf", "preset", "temporal")
    return {k: getattr(args, k) for k in keys}


def _limit_threads(n: int) -> None:
    """n threads for torch and numba: numba's pool defaults to every core of the machine."""
    import torch

    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


class Worker:
    """A Ray Data actor: one model, loaded once; a batch of rows in, (src, error) rows out."""

    def __init__(
        self,
        checkpoint,
        device: str,
        threads: int,
        options: dict,
        places: list[Place],
        out: Place,
        factor: Place | None,
    ):
        from .enhance_cli import Run
        from .enhancer import load_model

        if threads:
            _limit_threads(threads)
        self.enhancer = load_model(checkpoint, device=device)
        self.options, self.places, self.out = options, places, out
        self.outputs = [out, factor]
        ns = argparse.Namespace(output=Path(), factor_dir=Path() if factor else None, **options)
        self.run = Run(ns, self.enhancer, None)  # its enhance(): the same pixels and encoders

    def __call__(self, batch):
        """As `sgz enhance` does: the next image decodes and the last one encodes and is
        written in threads while the model runs on this one."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow as pa

        from .enhance_cli import Job, prefetch

        rows = batch.to_pylist()
        errors: list = [""] * len(rows)
        with (
            ThreadPoolExecutor(1, "sgz-read") as reader,
            ThreadPoolExecutor(1, "sgz-write") as writer,
        ):
            for i, (row, image) in enumerate(prefetch(reader, rows, self.decode)):
                if image is VIDEO:
                    errors[i] = self.video(row) or ""
                elif isinstance(image, str):
                    errors[i] = image
                else:
                    try:
                        writes = self.run.enhance(
                            Job(Path(row["path"]), PurePosixPath(row["name"])), image
                        )
                    except (RuntimeError, MemoryError) as e:  # out of memory on a huge image
                        errors[i] = f"enhance failed: {e}"
                        continue
                    errors[i] = [
                        writer.submit(self.write, place, rel.as_posix(), encode)
                        for place, (rel, encode) in zip(self.outputs, writes)
                    ]
        errors = [
            e if isinstance(e, str) else "; ".join(r for r in (f.result() for f in e) if r)
            for e in errors
        ]
        return pa.table({"src": [r["src"] for r in rows], "error": errors})

    @staticmethod
    def decode(row: dict):
        """The image, VIDEO, or why it cannot be enhanced."""
        from .imageio import ImageDecodeError, ImageTooLarge, decode_image

        if row["error"]:
            return row["error"]
        if row["kind"] == "video":
            return VIDEO
        try:
            return decode_image(row["data"])
        except (ImageDecodeError, ImageTooLarge) as e:
            return str(e)

    def write(self, place: Place, rel: str, encode) -> str | None:
        from .enhance_cli import write

        if place.local:
            return write(Path(place.join(rel)), encode)  # atomic: no half file to skip later
        try:  # object stores publish an object only once its upload completes
            data = encode()
            with place.fs.open_output_stream(place.join(rel)) as f:
                f.write(data)
        except (OSError, ValueError) as e:
            return f"cannot write {place.label_of(rel)}: {e}"
        return None

    def video(self, row: dict) -> str | None:
        """One video, one unit of work: copied through a temporary file when not local."""
        from . import video_cli
        from .video import enhance_video
        from .videoio import Cancelled, EncoderOptions, VideoError

        o, out, src = self.options, self.out, self.places[row["place"]]
        rel = video_cli.output_path(
            Path(), Path(row["name"]), Path(row["path"]), o["codec"]
        ).as_posix()
        with tempfile.TemporaryDirectory(prefix="sgz-ray-") as tmp:
            try:
                path = (
                    row["path"]
                    if src.local
                    else _copy(src.fs, row["path"], None, os.path.join(tmp, "in"))
                )
                dst = out.join(rel) if out.local else os.path.join(tmp, posixpath.basename(rel))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                enhance_video(
                    self.enhancer,
                    path,
                    dst,
                    temporal=o["temporal"],
                    denoise=o["denoise"],
                    exposure=o["exposure"],
                    encoder=EncoderOptions(o["codec"], o["crf"], o["preset"]),
                )
                if not out.local:
                    _copy(None, dst, out.fs, out.join(rel))
            except (VideoError, Cancelled) as e:
                return str(e)
            except OSError as e:
                return f"cannot read or write: {e}"
        return None


def _copy(src_fs, src: str, dst_fs, dst: str) -> str:
    """Stream a file between a pyarrow filesystem and a local path (None: local)."""
    from pyarrow import fs

    local = fs.LocalFileSystem()
    with (
        (src_fs or local).open_input_stream(src) as r,
        (dst_fs or local).open_output_stream(dst) as w,
    ):
        while chunk := r.read(COPY_CHUNK):
            w.write(chunk)
    return dst
