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
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
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
LANE_TIMEOUT_S = 60.0  # a batch lane that stalls this long: the waiting images go to the CPU
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


class BatchLane:
    """Calls from many threads gathered into batches for one thread, each caller blocked until
    its own result is back. Whatever is queued when the lane comes free is the next batch (up to
    `max_batch`): a lone call waits for nothing, a busy lane batches more. nvImageCodec coded
    ~9x more images a second in batches of 32 from one thread than image by image from 16
    (docs/performance.md, "JPEG coding on the GPU")."""

    def __init__(self, name: str, run: Callable[[list], list], max_batch: int):
        self._run, self._max = run, max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0  # batches run, and items in them: for tests and benchmarks
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __call__(self, item):
        done: Future = Future()
        self._queue.put((item, done))
        return done.result(timeout=LANE_TIMEOUT_S)  # raises TimeoutError: the caller falls back

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self._max:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:  # closed while gathering: finish this batch, then stop
                batch.pop()
                self._queue.put(None)
            self.batches, self.items = self.batches + 1, self.items + len(batch)
            try:
                results = self._run([item for item, _ in batch])
                for (_, done), result in zip(batch, results, strict=True):
                    done.set_result(result)
            except Exception as e:  # the whole batch's callers see it (and fall back)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(e)


class GpuJpeg:
    """One nvImageCodec decoder and encoder per thread (the service decodes and encodes in
    thread pools), all on `device`; with `batch` > 1, one of each on a lane of their own that
    codes what the pool threads hand it in batches of up to `batch` (SGZ_JPEG_GPU_BATCH)."""

    def __init__(self, nvimgcodec: ModuleType, device: torch.device, batch: int = 1):
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
        self._lanes: tuple[BatchLane, BatchLane] | None = None
        if batch > 1:
            self._lanes = (
                BatchLane("sgz-gpu-decode", self._decode_many, batch),
                BatchLane("sgz-gpu-encode", self._encode_many, batch),
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
            hwc = self._lanes[0](data) if self._lanes else self._decode_many([data])[0]
        except Exception as e:  # a CUDA or nvImageCodec error: the CPU decodes this one
            self._failed("decode", e)
            return None
        if hwc is None:
            return None
        if hwc.shape != (h, w, 3) or hwc.dtype != torch.uint8 or hwc.device != self.device:
            return None
        return GpuDecoded(w, h), hwc.permute(2, 0, 1)[None]

    def _decode_many(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """(H, W, 3) uint8 tensors on the GPU (None where nvImageCodec declined); without
        lanes, nvImageCodec's single-image call (the path measured image by image)."""
        one = self._lanes is None
        decoder, _ = self._coders()
        stream = self._stream()
        with torch.cuda.stream(stream):
            images = decoder.decode(
                datas[0] if one else datas,
                params=self._decode_params,
                cuda_stream=stream.cuda_stream,
            )
            images = [images] if one else images
            # from_dlpack keeps each image alive
            out = [None if im is None else torch.from_dlpack(im) for im in images]
        if self._local.stream is not None:
            stream.synchronize()  # complete before the model's stream reads them
        return out

    def encode(self, image: torch.Tensor, quality: int) -> bytes | None:
        """(1, 3, H, W) or (3, H, W) uint8 on the GPU -> JPEG bytes (4:2:0, as the CPU path
        writes them), or None: the CPU's turn."""
        hwc = (image[0] if image.dim() == 4 else image).permute(1, 2, 0)
        try:
            if self._lanes:
                return self._lanes[1]((hwc, quality))
            return self._encode_many([(hwc, quality)])[0]
        except Exception as e:
            self._failed("encode", e)
            return None

    def _encode_many(self, items: list) -> list[bytes | None]:
        """((H, W, 3) uint8 on the GPU, quality) -> JPEG bytes or None, one call per quality
        asked for; without lanes, nvImageCodec's single-image call."""
        one = self._lanes is None
        _, encoder = self._coders()
        stream = self._stream()  # the answers are complete: run_batch waited for their batch
        out: list[bytes | None] = [None] * len(items)
        for quality in sorted({q for _, q in items}):
            which = [i for i, (_, q) in enumerate(items) if q == quality]
            params = self.nv.EncodeParams(
                quality_type=self.nv.QualityType.QUALITY,
                quality_value=quality,
                chroma_subsampling=self.nv.ChromaSubsampling.CSS_420,
            )
            with torch.cuda.stream(stream):
                pixels = [  # views of the tensors; each keeps its tensor alive
                    self.nv.as_image(
                        items[i][0].contiguous(),
                        stream.cuda_stream,
                        sample_format=self.nv.SampleFormat.I_RGB,
                    )
                    for i in which
                ]
                coded = encoder.encode(
                    pixels[0] if one else pixels,
                    "jpeg",
                    params=params,
                    cuda_stream=stream.cuda_stream,
                )
            for i, data in zip(which, [coded] if one else coded, strict=True):
                out[i] = None if data is None else bytes(memoryview(data))
        return out

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


def open_gpu_jpeg(
    codec: str, device: torch.device | str, batch: int = 1
) -> tuple[GpuJpeg | None, str]:
    """The GPU JPEG codec for `device`, or None; and the reason, for the start-up log. `codec`
    "gpu" asks for it (the caller fails when it is None), "auto" uses it when it works, "cpu"
    never does; `batch` > 1 codes in batches (GpuJpeg)."""
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
        gpu = GpuJpeg(nvimgcodec, device, batch)
        self_test(gpu)
    except Exception as e:
        return None, f"JPEG coding on the CPU: nvImageCodec failed its self-test ({e})"
    batched = f", in batches of up to {batch}" if batch > 1 else ""
    return gpu, f"JPEG decode and encode on {device} by nvImageCodec {gpu.version}{batched}"


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
