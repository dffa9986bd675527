"""The video pipeline: decode -> model -> encode in three threads (see model/videoio.py).

Bounded queues of QUEUE batches between the stages keep memory flat whatever the video's
length; the decoder and the encoder are FFmpeg's (they release the GIL), the model step is
numba or torch (it does too), so the three overlap on separate cores.
"""

import os
import queue
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from .videoio import (
    CODECS,
    CONTAINERS,
    Cancelled,
    EncoderOptions,
    VideoError,
    VideoInfo,
    _info,
    _reason,
    av,
    expected_frames,
    open_input,
)

QUEUE = 2  # batches in flight between two stages: bounded memory, enough to overlap


class _Stop(Exception):
    """Another stage failed or the caller cancelled: this stage stops quietly."""


class _Stages:
    """The queues and the stop signal shared by the three stages."""

    def __init__(self, cancel: threading.Event | None):
        self.decoded: queue.Queue[tuple] = queue.Queue(QUEUE)  # (kind, item)
        self.enhanced: queue.Queue[tuple] = queue.Queue(QUEUE)
        self.cancel = cancel or threading.Event()
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self.busy = {"decode_s": 0.0, "model_s": 0.0, "encode_s": 0.0}

    def stopped(self) -> bool:
        return self.cancel.is_set() or self.failed.is_set()

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stopped():
                raise _Stop
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def get(self, q: queue.Queue):
        while True:
            if self.stopped():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                pass

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.failed.set()


def pipeline(
    src,
    dst,
    process,
    *,
    encoder: EncoderOptions | None = None,
    batch: int = 4,
    progress=None,
    cancel: threading.Event | None = None,
    run_model=None,
) -> dict:
    """Decode `src`, run `process(frames uint8 (N, 3, H, W)) -> same` on batches of frames
    (None: no model, a plain transcode), encode into `dst`. Returns the counts and seconds
    for `VideoStats`."""
    encoder = encoder or EncoderOptions()
    dst = Path(dst)
    fmt = CONTAINERS.get(dst.suffix.lower())
    if fmt is None:
        raise VideoError(f"{dst.name}: the output must end in one of {', '.join(CONTAINERS)}")
    if fmt == "webm" and encoder.codec not in ("vp9", "av1"):
        raise VideoError(f"{dst.name}: WebM holds vp9 or av1, not {encoder.codec}")
    if not dst.parent.is_dir():
        raise VideoError(f"{dst.parent}: no such folder for the output")
    start = time.perf_counter()
    stages = _Stages(cancel)
    source = open_input(src)
    part = dst.with_name(f".{dst.stem}.part{os.getpid()}-{threading.get_ident()}{dst.suffix}")
    try:
        info = _info(source, Path(src).name)
        reader = _Reader(source, info, batch)
        first = reader.first()  # the rotation is on the frames: needed before the header
        info.rotation = first.rotation
        with av.open(str(part), "w", format=fmt) as sink:
            writer = _Writer(sink, source, info, encoder)
            threads = [
                threading.Thread(
                    target=_guard, args=(stages, f, *a), daemon=True, name=f"sgz-video-{f.__name__}"
                )
                for f, *a in ((reader.run, stages, first), (_model, stages, process, run_model))
            ]
            for t in threads:
                t.start()
            try:
                frames = writer.run(stages, expected_frames(info), progress)
            except _Stop:
                frames = 0
            except av.FFmpegError as e:
                stages.fail(VideoError(f"cannot write {dst.name}: {_reason(e)}"))
            except BaseException as e:  # the other stages see it and stop
                stages.fail(e)
            finally:
                for t in threads:
                    t.join()
        if stages.error is not None:
            raise stages.error
        if stages.cancel.is_set():
            raise Cancelled("cancelled")
        if reader.short_by(frames):
            raise VideoError(
                f"{Path(src).name}: truncated or corrupt: {frames} of the "
                f"~{expected_frames(info)} frames it lists could be decoded"
            )
        os.replace(part, dst)
    except _Stop:
        raise stages.error if stages.error is not None else Cancelled("cancelled") from None
    finally:
        source.close()
        part.unlink(missing_ok=True)
    return dict(
        frames=frames,
        seconds=time.perf_counter() - start,
        info=info,
        dropped_streams=writer.dropped,
        **stages.busy,
    )


def _guard(stages: _Stages, fn, *args) -> None:
    try:
        fn(*args)
    except _Stop:
        pass
    except BaseException as e:  # handed to the calling thread, which raises it
        stages.fail(e)


def _frames_error(e: Exception, decoded: int) -> VideoError:
    return VideoError(f"the video is corrupt or truncated after frame {decoded}: {_reason(e)}")


class _Reader:
    """Demux + decode in order: RGB frames in batches, and the copied streams' packets."""

    def __init__(self, source, info: VideoInfo, batch: int):
        self.stream = source.streams.video[0]
        self.stream.thread_type = "AUTO"  # FFmpeg's frame threads: decoding keeps pace
        self.info, self.batch = info, batch
        self.copied = copyable(source)
        self.items = self._items(source.demux([self.stream, *self.copied]))
        self.decoded = 0
        self.pending: list = []
        self.step: int | None = None  # pts step for frames without a timestamp

    def _items(self, packets):
        try:
            for packet in packets:
                if packet.stream.type == "video":
                    yield from packet.decode()
                elif packet.dts is not None:  # not the demuxer's flush packet
                    yield packet
        except av.FFmpegError as e:
            raise _frames_error(e, self.decoded) from None

    def first(self):
        """The first video frame; the packets before it are kept for `run`."""
        for item in self.items:
            if isinstance(item, av.VideoFrame):
                return item
            self.pending.append(item)
        raise VideoError("the video stream has no frame that FFmpeg can decode")

    def short_by(self, written: int) -> bool:
        """Fewer frames than the container's count or duration promise (a cut-off or corrupt
        file whose demuxer stops without an error); 5% slack for rounded durations."""
        expected = expected_frames(self.info)
        return expected is not None and written < 0.95 * expected - 1

    def run(self, stages: _Stages, first) -> None:
        if self.pending:
            stages.put(stages.decoded, ("packets", self.pending))
        pts, frames = [], []
        pending = [first]
        while True:
            start = time.perf_counter()
            item = pending.pop() if pending else next(self.items, None)
            if item is None:
                break
            if not isinstance(item, av.VideoFrame):
                stages.busy["decode_s"] += time.perf_counter() - start
                stages.put(stages.decoded, ("packets", [item]))
                continue
            pts.append(self._pts(item))
            frames.append(
                item.to_ndarray(format="rgb24", width=self.info.width, height=self.info.height)
            )  # size changes: rescaled
            self.decoded += 1
            stages.busy["decode_s"] += time.perf_counter() - start
            if len(frames) == self.batch:
                stages.put(stages.decoded, ("frames", (pts, np.stack(frames))))
                pts, frames = [], []
        if frames:
            stages.put(stages.decoded, ("frames", (pts, np.stack(frames))))
        stages.put(stages.decoded, ("end", None))

    def _pts(self, frame) -> int:
        """The frame's timestamp in the stream's time base; counted on from the last one where
        a container (raw streams, some AVIs) gives none."""
        if frame.pts is not None:
            self.last = frame.pts
            return frame.pts
        if self.step is None:
            tb, rate = self.stream.time_base or Fraction(1, 1000), self.info.fps or 25
            self.step = max(1, round(1 / (rate * tb)))
        self.last = getattr(self, "last", -self.step) + self.step
        return self.last


def _model(stages: _Stages, process, run_model) -> None:
    import torch

    while True:
        kind, item = stages.get(stages.decoded)
        if kind == "frames" and process is not None:
            start = time.perf_counter()
            pts, arr = item
            images = torch.from_numpy(arr).permute(0, 3, 1, 2)  # channels-last, no copy
            out = run_model(process, images) if run_model else process(images)
            item = pts, np.ascontiguousarray(out.permute(0, 2, 3, 1).cpu().numpy())
            stages.busy["model_s"] += time.perf_counter() - start
        stages.put(stages.enhanced, (kind, item))
        if kind == "end":
            return


# audio and subtitle codecs each container takes as they are (matroska takes any)
COPYABLE = {
    "mp4": {"aac", "mp3", "opus", "alac", "ac3", "eac3", "flac", "mp2", "mov_text"},
    "webm": {"opus", "vorbis", "webvtt"},
    "avi": {"mp3", "ac3", "mp2", "pcm_s16le"},
}
COPYABLE["mov"] = COPYABLE["mp4"] | {"pcm_s16le", "pcm_s24le", "pcm_f32le"}


def copyable(source, fmt: str | None = None) -> list:
    """The audio and subtitle streams of `source` to copy (all when `fmt` is None)."""
    streams = [s for s in source.streams if s.type in ("audio", "subtitle")]
    if fmt is None or fmt == "matroska":
        return streams
    return [s for s in streams if s.codec_context.name in COPYABLE.get(fmt, set())]


class _Writer:
    """Encode + mux in the calling thread."""

    def __init__(self, sink, source, info: VideoInfo, encoder: EncoderOptions):
        vs = source.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate or Fraction(25)
        self.sink = sink
        self.stream = sink.add_stream(
            CODECS[encoder.codec][0], rate=rate, options=encoder.stream_options()
        )
        self.stream.width, self.stream.height = info.width, info.height
        even = info.width % 2 == 0 and info.height % 2 == 0  # 4:2:0 needs even sizes
        self.stream.pix_fmt = "yuv420p" if even else "yuv444p"
        self.time_base = vs.time_base or Fraction(1, 1000)
        self.stream.time_base = self.stream.codec_context.time_base = self.time_base
        if info.rotation:
            self.stream.set_display_rotation(info.rotation)
        kept = copyable(source, sink.format.name.split(",")[0])
        self.copies = {s.index: sink.add_stream_from_template(s) for s in kept}
        self.skipped = 0
        self.dropped = [
            f"{s.type} #{s.index} ({s.codec_context.name})"
            for s in copyable(source)
            if s.index not in self.copies
        ]

    def _copy(self, packet) -> None:
        try:
            self.sink.mux(packet)
        except av.FFmpegError:  # a damaged packet (timestamps out of order): skipped, the
            self.skipped += 1  # video's own damage is what decides the error

    def run(self, stages: _Stages, total: int | None, progress) -> int:
        done = 0
        while True:
            kind, item = stages.get(stages.enhanced)
            if kind == "end":
                break
            start = time.perf_counter()
            if kind == "packets":
                for packet in item:
                    if packet.stream.index in self.copies:
                        packet.stream = self.copies[packet.stream.index]
                        self._copy(packet)
            else:
                pts, arr = item
                for p, rgb in zip(pts, arr):
                    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                    frame.pts, frame.time_base = p, self.time_base
                    self.sink.mux(self.stream.encode(frame))
                done += len(pts)
            stages.busy["encode_s"] += time.perf_counter() - start
            if kind == "frames" and progress is not None:
                progress(done, total)
        start = time.perf_counter()
        self.sink.mux(self.stream.encode(None))
        stages.busy["encode_s"] += time.perf_counter() - start
        return done
