"""Everything one running app owns: the model, the batcher, the thread pool for image I/O,
the factor store, the video jobs and the metrics. Created in the app's lifespan, reached by
routes through `request.app.state.runtime`.
"""

import asyncio
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from model import Enhancer, png
from model.gpu_jpeg import GpuDecoded, GpuJpeg, open_gpu_jpeg
from model.imageio import DecodedImage, ImageDecodeError, ImageTooLarge, decode_image

from . import tracing
from .batching import Batcher, QueueFull
from .errors import ApiError
from .factor_store import open_factor_store
from .inference import Output, Work, run_batch, warmup_images
from .jobs import JobManager
from .memory import Trimmer
from .metrics import Metrics
from .settings import Settings
from .uploads import client_gone, read_image_bytes

log = logging.getLogger("sgz.service")
T = TypeVar("T")
# an upload decoded: what its answer is encoded by, and its pixels (1, 3, H, W)
Decoded = tuple[DecodedImage | GpuDecoded, torch.Tensor]


@dataclass
class Timing:
    """Seconds spent per stage, for the Server-Timing header."""

    queue: float = 0.0
    inference: float = 0.0
    decode: float = 0.0
    encode: float = 0.0

    def header(self) -> str:
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in vars(self).items())


class Runtime:
    def __init__(self, settings: Settings, enhancer: Enhancer, metrics: Metrics):
        self.settings = settings
        self.enhancer = enhancer
        self.metrics = metrics
        self.ready = False
        self.factors = open_factor_store(settings, metrics.registry)  # Redis when set
        self.coming = 0  # requests being read or decoded: the batcher's jobs on their way
        self.gpu_jpeg, why = open_gpu_jpeg(
            settings.jpeg_codec, enhancer.device, settings.jpeg_gpu_batch
        )
        if self.gpu_jpeg is None and settings.jpeg_codec == "gpu":
            raise RuntimeError(f"SGZ_JPEG_CODEC=gpu, but {why.partition(': ')[2] or why}")
        log.info("%s", why)
        # Separate pools: under load, the encodes of finished batches do not queue behind the
        # decodes of newly arrived uploads.
        lower = partial(lower_priority, settings.worker_nice)
        self.decode_pool = ThreadPoolExecutor(
            settings.io_threads, thread_name_prefix="sgz-decode", initializer=lower
        )
        self.encode_pool = ThreadPoolExecutor(
            settings.io_threads, thread_name_prefix="sgz-encode", initializer=lower
        )
        self.batcher = Batcher(
            tracing.traced_batches(
                partial(run_batch, enhancer), enhancer.backend, str(enhancer.device)
            ),
            max_batch_size=settings.max_batch_size,
            max_batch_pixels=settings.max_batch_pixels,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_size=settings.max_queue_size,
            on_batch=metrics.observe_batch,
            on_drop=lambda reason: metrics.dropped.labels(reason).inc(),
            worker_initializer=lower,
            coming=(lambda: self.coming) if settings.early_dispatch else None,
        )
        metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.jobs = JobManager(settings, enhancer, self.batcher, metrics, lower)
        self.trimmer = Trimmer(self.batcher, settings.trim_idle_s, metrics.observe_trim)
        self._trimming: asyncio.Task | None = None
        metrics.describe_model(
            enhancer.sha256, enhancer.checkpoint.source, str(enhancer.device), _versions()
        )

    def start(self) -> None:
        self.batcher.start()
        self.jobs.start()
        self._trimming = asyncio.get_running_loop().create_task(self.trimmer.run(), name="sgz-trim")

    async def warm_up(self) -> None:
        """Run the model once, then report ready (a failure leaves /readyz at 503)."""
        if self.settings.warmup:
            start = time.perf_counter()
            try:
                # in the inference thread (per-thread state such as cuDNN handles), but outside
                # the queue so that metrics count only real traffic. Enhancer.warmup compiles
                # the kernels for both layouts (decoded JPEGs arrive channels-last)
                await self.batcher.run_in_worker(self.enhancer.warmup)
                await asyncio.to_thread(png.warmup)  # the PNG reader's kernels
                await self.batcher.run_in_worker(run_batch, self.enhancer, warmup_images())
            except Exception:
                log.exception("warm-up failed: the service stays not ready")
                return
            log.info("warm-up took %.2f s", time.perf_counter() - start)
        self.ready = True
        log.info(
            "ready: checkpoint %s on %s",
            self.enhancer.sha256[:12],
            self.enhancer.device,
            extra={"event": "ready"},
        )

    async def close(self) -> None:
        """Cancel the video jobs, finish every queued request, then stop the threads."""
        self.ready = False
        if self._trimming is not None:
            self._trimming.cancel()
        await self.jobs.close()  # first: their model steps need the batcher's thread
        await self.batcher.close()
        self.decode_pool.shutdown(wait=True)
        self.encode_pool.shutdown(wait=True)

    @staticmethod
    async def run_in(pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def check_ready(self) -> None:
        if not self.ready:
            raise ApiError(
                503,
                "not_ready",
                "the model is still warming up; retry shortly",
                {"Retry-After": str(self.settings.retry_after_s)},
            )

    async def receive_image(self, request, timing: Timing) -> Decoded:
        """Read the upload and decode it, counted in `coming` all the while. The count drops
        just before the caller submits (nothing awaits in between), so the batcher never
        sees a request as neither coming nor queued."""
        self.coming += 1
        try:
            data = await read_image_bytes(request, self.settings.max_upload_bytes)
            # the deadline runs from here: a slow upload is the body timeout's business
            request.state.received = time.monotonic()
            return await self.decode(data, timing)
        finally:
            self.coming -= 1

    async def decode(self, data: bytes, timing: Timing) -> Decoded:
        if not data:
            raise ApiError(400, "empty_image", "the upload is empty: no image bytes")
        if self.batcher.full:  # no point decoding what cannot be queued
            raise QueueFull("the queue is full")
        start = time.perf_counter()
        try:
            with tracing.span("decode", **{"sgz.image.bytes": len(data)}):
                decoded, tensor = await self.run_in(
                    self.decode_pool, _decode, data, self.settings.max_pixels, self.gpu_jpeg
                )
        except ImageTooLarge as e:
            raise ApiError(413, "image_too_large", f"{e} (SGZ_MAX_PIXELS)") from None
        except ImageDecodeError as e:
            if await self.run_in(self.decode_pool, _recognised, data):
                raise ApiError(400, "corrupt_image", str(e)) from None
            raise ApiError(415, "unsupported_image", str(e)) from None
        except Exception as e:  # whatever a hostile file makes Pillow raise: still bad input
            log.warning("decode failed: %s: %s", type(e).__name__, e)
            raise ApiError(
                400, "corrupt_image", f"the image could not be decoded ({type(e).__name__}: {e})"
            ) from None
        timing.decode = time.perf_counter() - start
        self.metrics.decode.observe(timing.decode)
        self.metrics.coded.labels("decode", "gpu" if tensor.is_cuda else "cpu").inc()
        return decoded, tensor

    async def infer(self, request, work: Work, timing: Timing) -> Output:
        arrival = request.state.arrival
        received = getattr(request.state, "received", arrival)
        submitted = tracing.now_ns() if tracing.enabled() else 0
        if submitted:  # the batch span links to this request's span
            work = replace(work, trace=tracing.current_context())
        result = await self.batcher.submit(
            work,
            key=work.key,
            pixels=work.pixels,
            arrival=arrival,
            deadline=received + self.settings.request_timeout_s,
            is_disconnected=partial(client_gone, request),
        )
        timing.queue, timing.inference = result.queue_s, result.inference_s
        if submitted:
            tracing.record("queue", submitted, result.queue_s)
            tracing.record(
                "inference",
                submitted + int(result.queue_s * 1e9),
                result.inference_s,
                **{"sgz.batch.size": result.batch_size},
            )
        self.metrics.queue_wait.observe(result.queue_s)
        return result.value

    async def encode(self, fn: Callable[..., T], *args, timing: Timing) -> T:
        start = time.perf_counter()
        with tracing.span("encode"):
            body = await self.run_in(self.encode_pool, fn, *args)
        timing.encode = time.perf_counter() - start
        self.metrics.encode.observe(timing.encode)
        return body


def lower_priority(nice: int) -> None:
    """Run the calling thread at a lower CPU priority (Linux: nice is per thread; threads it
    starts, such as numba's pool, inherit it). The CPU-heavy threads (decode, model, encode)
    get it so that the event loop, which accepts connections and reads requests, is never
    starved by them: under heavy load requests otherwise wait seconds before uvicorn reads them
    (docs/performance.md, "Worker threads below the event loop").
    Elsewhere, or if refused, the thread keeps its priority."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("could not lower a worker thread's priority (nice %d): %s", nice, e)


def _decode(data: bytes, max_pixels: int, gpu: GpuJpeg | None) -> Decoded:
    if gpu is not None:  # None back: not a JPEG the GPU takes, or it failed: the CPU's turn
        got = gpu.decode(data, max_pixels)
        if got is not None:
            return got
    decoded = decode_image(data, max_pixels=max_pixels)
    return decoded, decoded.to_tensor()


def _recognised(data: bytes) -> bool:
    """Does Pillow know this format? (Then the file is broken: 400, else 415.)"""
    try:
        Image.open(io.BytesIO(data)).close()
    except UnidentifiedImageError:
        return False
    except Exception:
        pass
    return True


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": str(torch.__version__)}
    try:
        out["sgz"] = version("sgz-serve")
    except PackageNotFoundError:
        out["sgz"] = "unknown"
    return out
