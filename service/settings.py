"""Every setting of the service, from the environment (prefix SGZ_) or from `sgz serve` flags.

`sgz serve --port 9000` beats `SGZ_PORT=9000`, which beats the defaults below.
"""

import difflib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB
ORIGIN = re.compile(r"\*|[a-z][a-z0-9+.-]*://[^/\s,]+")
NOT_SETTINGS = {"SGZ_SHARED", "SGZ_TEST_DEVICE"}  # read by the tests, not by the service


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SGZ_", env_ignore_empty=True, extra="forbid")

    # Where and what to serve.
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in Docker)")
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: Path | None = Field(
        None, description="checkpoint file; unset = the built-in default checkpoint"
    )
    device: str | None = Field(
        None, description="cpu, cuda, cuda:1...; unset = cuda when PyTorch sees a GPU, else cpu"
    )
    api_key: SecretStr | None = Field(
        None,
        description="when set, every endpoint but /healthz "
        "and /readyz needs `X-API-Key` or `Authorization: Bearer`",
    )

    # Micro-batching (see service/batching.py).
    max_batch_size: int = Field(16, ge=1, description="images per forward pass")
    # 8 Mi pixels: a batch's uint8 input and output (3 bytes a pixel) stay under glibc's 32 MB
    # mmap threshold, so their memory is reused rather than page-faulted in fresh every batch
    # (docs/performance.md, "Batches of at most 8 Mi pixels")
    max_batch_pixels: int = Field(
        8 * MiB,
        ge=1,
        description="pixels per forward pass (an image larger than this still runs, alone)",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="longest a request waits, from its "
        "arrival, for others to share its forward pass (see "
        "early_dispatch)",
    )
    early_dispatch: bool = Field(
        True,
        description="run a batch at once when no other "
        "request is being read or decoded (nothing could join it); "
        "false: always wait up to max_wait_ms",
    )
    max_queue_size: int = Field(
        256,
        ge=1,
        description="images waiting for a forward pass; beyond this requests get 503 at once",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="deadline from the end of the "
        "upload; the request then gets 504: still queued, it is "
        "never computed; in a running batch, its result is dropped",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503")

    # Input limits.
    max_upload_bytes: int = Field(
        32 * MiB, ge=1, description="request body size, counted while reading (413 beyond)"
    )
    max_pixels: int = Field(
        16 * MiB, ge=1, description="decoded image size, checked before decompressing (413 beyond)"
    )

    # Recent factor maps for GET /factor/{factor_id} (stored at EFE's low resolution), in this
    # process or, with redis_url, in Redis shared by all replicas (docs/scaling.md). The
    # bounds are per process in memory, for all replicas together in Redis.
    factor_store_items: int = Field(1024, ge=0)
    factor_store_bytes: int = Field(64 * MiB, ge=0)
    factor_ttl_s: float = Field(3600.0, gt=0, description="how long a factor map is kept")
    # a 16 Mi-pixel image's map is 1.4 MB; larger values would stall Redis's single thread
    factor_map_max_bytes: int = Field(
        4 * MiB, ge=0, description="a larger map is not kept (the answer then has no X-Factor-ID)"
    )
    redis_url: SecretStr | None = Field(
        None,
        description="redis://[:password@]host:port/db: "
        "keep factor maps and video job records in Redis, shared by every replica; "
        "unset = in this process",
    )
    redis_timeout_s: float = Field(
        0.25,
        gt=0,
        description="connect and reply timeout of each "
        "Redis call; a Redis that fails one is left alone for 1 s",
    )

    # Browsers (service/security.py).
    cors_origins: str | None = Field(
        None,
        description="comma-separated origins allowed to "
        "call from a browser (CORS), e.g. https://app.example.com; "
        "* = any; unset = no CORS headers",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        for origin in (value or "").split(","):
            if origin.strip() and not ORIGIN.fullmatch(origin.strip()):
                raise ValueError(
                    f"{origin.strip()!r} is not an origin: scheme://host[:port], "
                    "no path, no trailing slash (or *)"
                )
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    # Video jobs (service/jobs.py). They live in memory and in jobs_dir: none survives a
    # restart.
    jobs_dir: Path | None = Field(
        None,
        description="where uploads and results go (a fresh "
        "folder inside it, removed at shutdown); unset = the "
        "system's temporary folder; with redis_url, a folder every replica mounts "
        "lets any replica serve any job's result",
    )
    max_running_jobs: int = Field(1, ge=1, description="video jobs enhanced at once")
    max_queued_jobs: int = Field(
        8, ge=0, description="video jobs waiting to run; beyond this POST /jobs gets 503"
    )
    max_video_upload_bytes: int = Field(
        512 * MiB, ge=1, description="video upload size, counted while reading (413 beyond)"
    )
    max_video_duration_s: float = Field(
        600.0, gt=0, description="longest video accepted (413 beyond)"
    )
    max_jobs_disk_bytes: int = Field(
        8 * GiB,
        ge=1,
        description="uploads and results on disk, all jobs together; POST /jobs gets 503 beyond",
    )
    job_result_ttl_s: float = Field(
        3600.0, gt=0, description="how long a finished job and its result are kept"
    )
    job_yield_ms: float = Field(
        250.0,
        ge=0,
        description="longest a video job's batch of "
        "frames waits for queued image requests before taking its "
        "turn on the model",
    )

    # Connections (service/protocol.py, service/server.py): what a slow, idle or hostile
    # client may hold. Past a deadline the client gets 408 or the connection is closed.
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request's headers must all "
        "arrive within this, from the connection's opening or the "
        "first byte after a kept-alive answer",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request's body may take this "
        "long, plus 1 s per min_transfer_rate bytes received",
    )
    write_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a client that reads its answer "
        "slower than min_transfer_rate over this long is cut off, "
        "freeing the answer",
    )
    min_transfer_rate: float = Field(
        1024.0,
        gt=0,
        description="bytes/s: the slowest average "
        "rate a client may send a body or read an answer at, "
        "once its timeout has passed",
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, description="an idle connection is closed this long after its last answer"
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="open connections; beyond, new ones "
        "get 503 and are closed (lowered to fit the open-files limit)",
    )
    shutdown_grace_s: float = Field(
        3.0,
        ge=0,
        description="on SIGTERM, how long the service "
        "keeps answering new requests with 503 shutting_down "
        "before it stops listening (longer while requests are "
        "still in flight)",
    )

    # Process.
    io_threads: int = Field(
        default_factory=lambda: min(16, max(4, os.cpu_count() or 1)),
        ge=1,
        description="threads decoding images, and as many encoding them (default: one per "
        "core, at least 4 and at most 16: JPEG coding is the CPU's share of the "
        "work, and with the model on a GPU it is most of the work)",
    )
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="nice value of the threads that "
        "decode, run the model and encode (Linux), so that they never "
        "starve the event loop that reads requests; 0 = no change",
    )
    jpeg_codec: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="where JPEGs are decoded and encoded: gpu = nvImageCodec on the model's "
        "GPU (start-up fails without it), cpu = libjpeg-turbo, auto = the GPU when the model "
        "runs on one and nvImageCodec works there, else the CPU",
    )
    jpeg_gpu_batch: int = Field(
        1,
        ge=1,
        le=256,
        description="with JPEG coding on the GPU: 1 = each pool thread decodes and encodes its "
        "own images; N > 1 = the pool threads hand them to one decoding and one encoding "
        "thread that code up to N at a time (docs/service.md, 'JPEG on the GPU')",
    )
    warmup: bool = Field(True, description="run the model once before reporting ready")
    shutdown_timeout_s: int = Field(
        30, ge=1, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    trim_idle_s: float = Field(
        2.0,
        ge=0,
        description="after this long with no batch, give "
        "freed memory back to the kernel (glibc malloc_trim); 0 = never",
    )
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug|trace)$")
    log_format: str = Field(
        "text",
        pattern="^(text|json)$",
        description="json: one JSON object per line, one line per request (docs/observability.md)",
    )


def unknown_variables(environ=os.environ) -> list[str]:
    """The SGZ_* variables that are no setting (a typo is otherwise ignored without a word),
    each with the closest setting's name when one is close."""
    known = {f"SGZ_{name.upper()}" for name in Settings.model_fields}
    found = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads them case-insensitively
        if upper.startswith("SGZ_") and upper not in known | NOT_SETTINGS:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found
