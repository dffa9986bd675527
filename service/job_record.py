"""A video job's record: its options, state and progress, and the JSON the API shows of it.
States: queued -> running -> done | failed | cancelled."""

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from model.video import EncoderOptions, VideoInfo

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)
UPLOAD = "upload"
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}


@dataclass(frozen=True)
class JobOptions:
    strength: float
    denoise: float
    exposure: float | str | None  # as enhance_video takes it
    temporal: bool
    encoder: EncoderOptions

    @property
    def suffix(self) -> str:
        return ".webm" if self.encoder.codec == "vp9" else ".mp4"

    def view(self) -> dict:
        exposure = "model" if self.exposure is None else self.exposure
        return {
            "strength": self.strength,
            "denoise": self.denoise,
            "exposure": exposure,
            "temporal": self.temporal,
            "codec": self.encoder.codec,
            "crf": self.encoder.crf,
            "preset": self.encoder.preset,
        }


@dataclass(eq=False)
class Job:
    id: str
    folder: Path
    options: JobOptions
    info: VideoInfo
    upload_bytes: int
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    started: float | None = None
    finished: float | None = None
    frames_done: int = 0
    frames_total: int | None = None
    error: str | None = None
    output_bytes: int | None = None
    dropped_streams: list[str] = field(default_factory=list)  # not copied into the result
    too_long: bool = False  # stopped because it ran past max_video_duration_s
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None

    @property
    def upload(self) -> Path:
        return self.folder / UPLOAD

    @property
    def output(self) -> Path:
        return self.folder / f"output{self.options.suffix}"

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.options.suffix]

    def fps(self) -> float | None:
        if self.started is None or not self.frames_done:
            return None
        seconds = (self.finished or time.time()) - self.started
        return round(self.frames_done / seconds, 2) if seconds > 0 else None

    def view(self) -> dict:
        fps, eta = self.fps(), None
        if self.state == DONE:
            eta = 0.0
        elif self.state == RUNNING and fps and self.frames_total:
            eta = round(max(0, self.frames_total - self.frames_done) / fps, 1)
        i = self.info
        return {
            "id": self.id,
            "state": self.state,
            "frames_done": self.frames_done,
            "frames_total": self.frames_total,
            "fps": fps,
            "eta_s": eta,
            "error": self.error,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "upload_bytes": self.upload_bytes,
            "output_bytes": self.output_bytes,
            "dropped_streams": self.dropped_streams,
            "result": f"/jobs/{self.id}/result" if self.state == DONE else None,
            "input": {
                "width": i.width,
                "height": i.height,
                "frames": i.frames,
                "fps": round(i.fps, 3),
                "duration_s": i.duration,
                "codec": i.codec,
                "audio_streams": i.audio,
            },
            "options": self.options.view(),
        }


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()
