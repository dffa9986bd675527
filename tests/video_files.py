"""Small real video files for the tests, written with PyAV, and what a test reads back."""

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

MS = Fraction(1, 1000)


def scene(t: int, width: int, height: int) -> np.ndarray:
    """A dark gradient with a brighter square moving right: (H, W, 3) uint8."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (np.linspace(8, 40, width)[None, :, None]).astype(np.uint8)
    x = (3 * t) % max(1, width - 12)
    img[height // 4 : height // 4 + 12, x : x + 12] = (70, 60, 50)
    return img


def make_video(
    path: Path,
    *,
    width: int = 96,
    height: int = 64,
    frames: int = 20,
    audio: bool = False,
    durations_ms=(40,),
    rotation: int = 0,
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    transfer: int | None = None,
    options: dict | None = None,
) -> list[float]:
    """Write a video; returns its frames' timestamps in seconds. `durations_ms` cycles: (40,)
    is 25 fps, (40, 40, 100) a variable frame rate."""
    stamps = []
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        s.time_base = s.codec_context.time_base = MS
        if transfer is not None:
            s.codec_context.color_trc = transfer
        if rotation:
            s.set_display_rotation(rotation)
        a = c.add_stream("aac", rate=48000) if audio else None
        if a is not None:
            a.layout = "mono"
        t_ms = 0
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(scene(t, width, height), format="rgb24")
            frame.pts, frame.time_base = t_ms, MS
            stamps.append(t_ms / 1000)
            t_ms += durations_ms[t % len(durations_ms)]
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
        if a is not None:
            for k in range(int(t_ms / 1000 * 48000 / 1024) + 1):
                tone = 0.1 * np.sin(2 * np.pi * 440 * (k * 1024 + np.arange(1024)) / 48000)
                af = av.AudioFrame.from_ndarray(
                    tone[None].astype(np.float32), format="fltp", layout="mono"
                )
                af.sample_rate, af.pts = 48000, k * 1024
                c.mux(a.encode(af))
            c.mux(a.encode(None))
    return stamps


@dataclass
class ReadBack:
    frames: np.ndarray  # (T, H, W, 3) uint8
    stamps: list[float]  # seconds
    rotation: int
    audio_packets: int
    fps: float
    codec: str
    pix_fmt: str


def read_video(path: Path) -> ReadBack:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(video=0))
        rgb = np.stack([f.to_ndarray(format="rgb24") for f in frames])
        stamps = [float(f.pts * f.time_base) for f in frames]
        rotation = frames[0].rotation
        fps, codec, pix_fmt = float(s.average_rate), s.codec_context.name, s.codec_context.pix_fmt
    audio = 0
    with av.open(str(path)) as c:
        if c.streams.audio:
            audio = sum(1 for p in c.demux(audio=0) if p.size)
    return ReadBack(rgb, stamps, rotation, audio, fps, codec, pix_fmt)
