"""Video: enhance a file or a stream of frames, with the temporal state that keeps it stable.

`enhance_video(enhancer, src, dst)` streams a video file through the model: decoding, the
model and encoding run in three threads with bounded queues between them, so memory stays
bounded whatever the length and the three overlap; frames go through the model in batches.
`VideoEnhancer` is the same model step on frames a caller brings (a camera stream), keeping
the temporal state (model/temporal.py) from one call to the next.
"""

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import videopipe
from .enhancer import DENOISE, Enhancer, check_options
from .temporal import TemporalConfig, TemporalState
from .videoio import Cancelled, EncoderOptions, VideoError, VideoInfo, probe  # noqa: F401

BATCH = 4  # frames per forward pass: EFE batches well, and the temporal state waits for them


@dataclass
class VideoStats:
    """What `enhance_video` / `transcode` did: frames written and seconds spent per stage
    (decode, model, encode are each the busy time of their own thread; `seconds` is wall)."""

    frames: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0
    encode_s: float = 0.0
    scene_cuts: int = 0
    # not copied: the container can't hold them
    dropped_streams: list[str] = field(default_factory=list)
    info: VideoInfo | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class VideoEnhancer:
    """Consecutive frames of one video in, enhanced frames out, the temporal state kept between
    calls. `process(frames)`: uint8 (N, 3, H, W) -> uint8 (N, 3, H, W) (channels-last in, the
    same layout out); frames must come in order, all of one size. `temporal=False` enhances
    each frame on its own, exactly as `Enhancer.enhance`."""

    def __init__(
        self,
        enhancer: Enhancer,
        *,
        strength: float = 1.0,
        denoise: float = DENOISE,
        exposure: float | str | None = "auto",
        temporal: bool = True,
        config: TemporalConfig | None = None,
    ):
        check_options(strength, denoise, exposure)
        self.enhancer = enhancer
        self.strength, self.denoise, self.exposure = float(strength), float(denoise), exposure
        self.temporal = temporal
        self.state = TemporalState(enhancer, config or TemporalConfig())

    def reset(self) -> None:
        """Forget the past frames (a new shot or a new stream)."""
        self.state.reset()

    @property
    def scene_cuts(self) -> int:
        return self.state.cuts

    @torch.inference_mode()
    def process(self, frames: torch.Tensor) -> torch.Tensor:
        enh = self.enhancer
        if not self.temporal:
            return enh.enhance(frames, self.strength, denoise=self.denoise, exposure=self.exposure)
        r_low = self.state.factor(frames, enh.factor_lowres(frames), self.exposure)
        if self.strength != 1.0:
            r_low = r_low * self.strength
        out = enh.apply_factor(frames, r_low, self.denoise)
        return self.state.denoise(frames, out, r_low, self.denoise)

    def frames(self, frames: Iterable[np.ndarray], batch: int = BATCH) -> Iterator[np.ndarray]:
        """Enhance an iterator of (H, W, 3) uint8 RGB frames lazily, `batch` at a time."""
        chunk: list[np.ndarray] = []
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == batch:
                yield from self._chunk(chunk)
                chunk = []
        if chunk:
            yield from self._chunk(chunk)

    def _chunk(self, chunk: list[np.ndarray]) -> list[np.ndarray]:
        images = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2)  # channels-last view
        out = self.process(images).permute(0, 2, 3, 1).cpu().numpy()
        return list(out)


def enhance_frames(
    enhancer: Enhancer, frames: Iterable[np.ndarray], *, batch: int = BATCH, **options
) -> Iterator[np.ndarray]:
    """Enhance an iterator of (H, W, 3) uint8 RGB frames (a camera stream), lazily; `options`
    as `VideoEnhancer` takes them (strength, denoise, exposure, temporal, config)."""
    return VideoEnhancer(enhancer, **options).frames(frames, batch)


def enhance_video(
    enhancer: Enhancer,
    src,
    dst,
    *,
    strength: float = 1.0,
    denoise: float = DENOISE,
    exposure: float | str | None = "auto",
    temporal: bool = True,
    config: TemporalConfig | None = None,
    encoder: EncoderOptions | None = None,
    batch: int = BATCH,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: threading.Event | None = None,
    run_model: Callable[..., object] | None = None,
) -> VideoStats:
    """Enhance the video file `src` into `dst` (see the module docstring). Same frame count,
    size, frame rate and timestamps; rotation kept; audio and subtitles copied. `dst` appears
    only when the whole video is written (a temporary file is renamed). `progress(done, total)`
    after each batch (total None when the container does not say); `cancel` set: stops and
    raises `Cancelled`; `run_model(fn, *args)` runs each model step (default: calls it; the
    service routes it through its inference thread). Raises `VideoError` for bad input."""
    vid = VideoEnhancer(
        enhancer,
        strength=strength,
        denoise=denoise,
        exposure=exposure,
        temporal=temporal,
        config=config,
    )
    stats = videopipe.pipeline(
        src,
        dst,
        vid.process,
        encoder=encoder,
        batch=batch,
        progress=progress,
        cancel=cancel,
        run_model=run_model,
    )
    stats_out = VideoStats(**stats)
    stats_out.scene_cuts = vid.scene_cuts
    return stats_out


def transcode(
    src,
    dst,
    *,
    encoder: EncoderOptions | None = None,
    batch: int = BATCH,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: threading.Event | None = None,
) -> VideoStats:
    """The same decode -> encode pipeline as `enhance_video` without the model: the floor
    `sgz bench --parts video` measures the model against."""
    return VideoStats(
        **videopipe.pipeline(
            src, dst, None, encoder=encoder, batch=batch, progress=progress, cancel=cancel
        )
    )
