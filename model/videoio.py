"""Video files in and out through PyAV (FFmpeg's libraries inside the wheel).

`pipeline` streams a file through a frame function in three threads with bounded queues:
decode (demux + decode + to RGB) -> model -> encode (from RGB + mux, the calling thread), so
memory stays bounded whatever the video's length. Video frames keep their timestamps (variable
frame rate survives), the display rotation is copied, audio and subtitle packets are copied
without re-encoding, and the output appears under its name only once it is complete.

Decided for 10-bit input: SDR video of 10 or 12 bits is decoded to 8-bit RGB (the model's
input) and written as 8-bit; HDR video (PQ or HLG transfer) is refused with a message, because
the model was trained on 8-bit sRGB and would need a tone-mapping step we do not guess.
"""

from dataclasses import dataclass
from pathlib import Path

try:
    import av
except ImportError:  # pragma: no cover - a dependency; the message says what to install
    av = None

# codec name -> (FFmpeg encoder, crf range, presets)
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)
CODECS = {
    "h264": ("libx264", 51, X264_PRESETS),
    "hevc": ("libx265", 51, X264_PRESETS),
    "vp9": ("libvpx-vp9", 63, X264_PRESETS),  # presets map to cpu-used (SPEEDS)
    "av1": ("libsvtav1", 63, X264_PRESETS),  # presets map to SVT-AV1's 0-13
}
SPEEDS = {"vp9": (8, 8, 7, 6, 5, 4, 3, 2, 1), "av1": (12, 11, 10, 9, 8, 7, 5, 4, 2)}
CONTAINERS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
}
HDR_TRANSFERS = {16: "PQ (SMPTE 2084)", 18: "HLG (ARIB STD-B67)"}


class VideoError(ValueError):
    """The input is not a video this pipeline can read, or the output cannot be written."""


class Cancelled(Exception):
    """The caller's cancel event was set; nothing was left under the output's name."""


@dataclass(frozen=True)
class EncoderOptions:
    codec: str = "h264"
    crf: int = 18  # x264's "visually lossless" end: the output is someone's archive
    preset: str = "medium"

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        top = CODECS[self.codec][1]
        if isinstance(self.crf, bool) or not isinstance(self.crf, int) or not 0 <= self.crf <= top:
            raise ValueError(
                f"crf for {self.codec} must be an integer in [0, {top}], got {self.crf!r}"
            )
        if self.preset not in CODECS[self.codec][2]:
            raise ValueError(
                f"preset must be one of {', '.join(X264_PRESETS)}, got {self.preset!r}"
            )

    def stream_options(self) -> dict[str, str]:
        if self.codec in SPEEDS:
            speed = SPEEDS[self.codec][X264_PRESETS.index(self.preset)]
            if self.codec == "vp9":  # constant quality: crf with b:v 0
                return {"crf": str(self.crf), "b:v": "0", "cpu-used": str(speed), "row-mt": "1"}
            return {"crf": str(self.crf), "preset": str(speed)}
        return {"crf": str(self.crf), "preset": self.preset}


@dataclass
class VideoInfo:
    width: int
    height: int
    frames: int | None  # as the container says (None: it does not)
    fps: float
    duration: float | None  # seconds
    codec: str
    pix_fmt: str
    bit_depth: int
    rotation: int  # degrees, as the display matrix says
    audio: int  # audio streams
    subtitles: int


def _require_av():
    if av is None:
        raise VideoError("video needs PyAV: pip install av")


def open_input(path) -> "av.container.InputContainer":
    _require_av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"{path.name}: not a video FFmpeg can read ({_reason(e)})") from None
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        container.close()
        raise VideoError(f"{path.name}: no video stream (streams: {kinds})")
    return container


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def is_video(path) -> bool:
    """Recognised by content: FFmpeg opens it and finds a video stream that is not a still
    image (an image format's single picture is not a video)."""
    try:
        with open_input(path) as c:
            _info(c, Path(path).name)
            return True
    except VideoError:
        return False


# FFmpeg renders text files as video (the tty demuxer takes any .txt): not videos to enhance
TEXT_CODECS = {"ansi", "bintext", "xbin", "idf"}
STILL_FORMATS = {
    "image2",
    "png_pipe",
    "jpeg_pipe",
    "webp_pipe",
    "bmp_pipe",
    "tiff_pipe",
    "gif",
    "gif_pipe",
    "pgm_pipe",
    "ppm_pipe",
    "pam_pipe",
    "qoi_pipe",
}


def _depth(stream) -> int:
    desc = av.VideoFormat(stream.codec_context.pix_fmt) if stream.codec_context.pix_fmt else None
    return max((c.bits for c in desc.components), default=8) if desc else 8


def probe(path) -> VideoInfo:
    """What `pipeline` would read: raises VideoError for what it cannot."""
    with open_input(path) as c:
        return _info(c, Path(path).name)


def _info(c, name: str) -> VideoInfo:
    s = c.streams.video[0]
    cc = s.codec_context
    if c.format.name in STILL_FORMATS:
        raise VideoError(f"{name}: a still image ({c.format.name}), not a video")
    if cc.name in TEXT_CODECS:
        raise VideoError(f"{name}: text ({c.format.name}), not a video")
    if cc.width <= 0 or cc.height <= 0:
        raise VideoError(
            f"{name}: the video stream has no frame size (unsupported codec {cc.name!r}?)"
        )
    trc = cc.color_trc
    if int(trc or 0) in HDR_TRANSFERS:
        raise VideoError(
            f"{name}: HDR video ({HDR_TRANSFERS[int(trc)]}) is not supported: "
            "the model works on SDR; tone-map it to SDR first"
        )
    rate = s.average_rate or s.guessed_rate or s.base_rate
    duration = (
        float(s.duration * s.time_base) if s.duration else c.duration / 1e6 if c.duration else None
    )
    return VideoInfo(
        cc.width,
        cc.height,
        s.frames or None,
        float(rate) if rate else 0.0,
        duration,
        cc.name,
        cc.pix_fmt or "?",
        _depth(s),
        0,
        len(c.streams.audio),
        len(c.streams.subtitles),
    )


def expected_frames(info: VideoInfo) -> int | None:
    if info.frames:
        return info.frames
    if info.duration and info.fps:
        return max(1, round(info.duration * info.fps))
    return None
