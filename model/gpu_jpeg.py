"""JPEG decode and encode on the GPU by nvImageCodec (nvJPEG, and the hardware JPEG decoder of
the GPUs that have one), for when the model runs there: an upload crosses to the GPU as its
compressed bytes and the answer comes back compressed, so the host CPU does no pixel work.

Only the common case goes this way: an upright 8-bit colour JPEG in, JPEG out. Everything else,
and anything nvImageCodec declines or fails at, takes the CPU path (model/imageio.py), which
gives the same answers and the same error messages. `open_gpu_jpeg` says why the GPU path is
off when it is (docs/service.md, "JPEG on the GPU").
"""

import io
import logging
import threading
from dataclasses import dataclass
from types import ModuleType

import torch
from PIL import Image

from model.imageio import ORIENTATION

log = logging.getLogger("sgz.gpu_jpeg")

CODECS = ("auto", "gpu", "cpu")  # SGZ_JPEG_CODEC
CODER_THREADS = 1  # nvImageCodec's helper threads per decoder and encoder (one per pool thread)
# Each pool thread on its own CUDA stream, synchronised before the pixels or bytes are handed
# on: an experiment for `bench.jpeg_gpu --own-streams` (off: torch's current stream, the path
# measured in docs/performance.md, whose per-image calls did not scale over threads)
OWN_STREAMS = False
INSTALL_HINT = "pip install 'sgz-serve[jpeg-cu12]' (or [jpeg-cu13], as torch's CUDA)"


@dataclass(frozen=True)
class GpuDecoded:
    """What the service keeps of an upload decoded on the GPU (its pixels are the tensor beside
    it); the same fields as `DecodedImage` that the answer's encoding reads."""

    width: int
    height: int
    format: str = "JPEG"
    alpha: None = None
    gray: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


class GpuJpeg:
    """One nvImageCodec decoder and encoder per thread (the service decodes and encodes in
    thread pools), all on `device`."""

    def __init__(self, nvimgcodec: ModuleType, device: torch.device):
        self.nv = nvimgcodec
        if device.index is None:  # "cuda": the current one, named, so tensors' devices compare
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.version = getattr(nvimgcodec, "__version__", "?")
        self._local = threading.local()
        self._failures = 0
        self._decode_params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,  # rotated JPEGs take the CPU path (upright_rgb_jpeg)
            color_spec=nvimgcodec.ColorSpec.SRGB,
            allow_any_depth=False,
        )

    def _coders(self):
        local = self._local
        if not hasattr(local, "decoder"):
            index, threads = self.device.index, CODER_THREADS
            local.decoder = self.nv.Decoder(device_id=index, max_num_cpu_threads=threads)
            local.encoder = self.nv.Encoder(device_id=index, max_num_cpu_threads=threads)
            local.stream = torch.cuda.Stream(self.device) if OWN_STREAMS else None
        return local.decoder, local.encoder

    def _stream(self) -> torch.cuda.Stream:
        # torch's current stream, so the pixels are ordered with the model's kernels
        return self._local.stream or torch.cuda.current_stream(self.device)

    def decode(self, data: bytes, max_pixels: int | None) -> tuple[GpuDecoded, torch.Tensor] | None:
        """(meta, (1, 3, H, W) uint8 channels-last on the GPU), or None: the CPU's turn (not an
        upright colour JPEG, over the pixel limit so the CPU path says so, or a decode error)."""
        size = upright_rgb_jpeg(data)
        if size is None or (max_pixels and size[0] * size[1] > max_pixels):
            return None
        w, h = size
        try:
            decoder, _ = self._coders()
            stream = self._stream()
            with torch.cuda.stream(stream):
                image = decoder.decode(
                    data, params=self._decode_params, cuda_stream=stream.cuda_stream
                )
                if image is None:
                    return None
                hwc = torch.from_dlpack(image)  # (H, W, 3) on the GPU; keeps the image alive
            if self._local.stream is not None:
                stream.synchronize()  # complete before the model's stream reads it
        except Exception as e:  # a CUDA or nvImageCodec error: the CPU decodes this one
            self._failed("decode", e)
            return None
        if hwc.shape != (h, w, 3) or hwc.dtype != torch.uint8 or hwc.device != self.device:
            return None
        return GpuDecoded(w, h), hwc.permute(2, 0, 1)[None]

    def encode(self, image: torch.Tensor, quality: int) -> bytes | None:
        """(1, 3, H, W) or (3, H, W) uint8 on the GPU -> JPEG bytes (4:2:0, as the CPU path
        writes them), or None: the CPU's turn."""
        hwc = (image[0] if image.dim() == 4 else image).permute(1, 2, 0)
        try:
            _, encoder = self._coders()
            params = self.nv.EncodeParams(
                quality_type=self.nv.QualityType.QUALITY,
                quality_value=quality,
                chroma_subsampling=self.nv.ChromaSubsampling.CSS_420,
            )
            stream = self._stream()  # the answer is complete: run_batch waited for its batch
            with torch.cuda.stream(stream):
                pixels = self.nv.as_image(  # a view of the tensor; keeps it alive
                    hwc.contiguous(), stream.cuda_stream, sample_format=self.nv.SampleFormat.I_RGB
                )
                out = encoder.encode(pixels, "jpeg", params=params, cuda_stream=stream.cuda_stream)
        except Exception as e:
            self._failed("encode", e)
            return None
        return None if out is None else bytes(memoryview(out))

    def _failed(self, what: str, e: Exception) -> None:
        self._failures += 1
        if self._failures <= 3:  # a broken GPU would otherwise log once per request
            log.warning("GPU JPEG %s failed, the CPU does it: %s: %s", what, type(e).__name__, e)


def upright_rgb_jpeg(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an 8-bit colour JPEG without an EXIF rotation, from its header alone;
    None for anything else."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode != "RGB":
            return None
        if img.getexif().get(ORIENTATION, 1) != 1:
            return None
        return img.size
    except Exception:
        return None


def open_gpu_jpeg(codec: str, device: torch.device | str) -> tuple[GpuJpeg | None, str]:
    """The GPU JPEG codec for `device`, or None; and the reason, for the start-up log. `codec`
    "gpu" asks for it (the caller fails when it is None), "auto" uses it when it works, "cpu"
    never does."""
    if codec not in CODECS:
        raise ValueError(f"JPEG codec {codec!r}: use one of {', '.join(CODECS)}")
    device = torch.device(device)
    if codec == "cpu":
        return None, "JPEG coding on the CPU (asked for)"
    if device.type != "cuda":
        return None, f"JPEG coding on the CPU: the model runs on {device}, not a CUDA GPU"
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None, f"JPEG coding on the CPU: nvImageCodec is not installed ({INSTALL_HINT})"
    try:
        gpu = GpuJpeg(nvimgcodec, device)
        self_test(gpu)
    except Exception as e:
        return None, f"JPEG coding on the CPU: nvImageCodec failed its self-test ({e})"
    return gpu, f"JPEG decode and encode on {device} by nvImageCodec {gpu.version}"


def self_test(codec: GpuJpeg) -> None:
    """A small picture encoded and decoded back on the GPU: raises when that does not work."""
    ramp = torch.arange(96 * 128 * 3, device=codec.device) % 251
    image = ramp.to(torch.uint8).view(96, 128, 3).permute(2, 0, 1)[None]
    data = codec.encode(image, 95)
    if data is None:
        raise RuntimeError("encoding failed")
    got = codec.decode(data, None)
    if got is None or got[1].shape != (1, 3, 96, 128):
        raise RuntimeError("decoding failed")
