"""Prometheus metrics, one registry per app (tests run several apps in one process).

Histograms rather than summaries, so that replicas can be aggregated (Triton #7287). The
average batch size is sgz_images_processed_total / sgz_batch_size_count.
"""

import platform

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# seconds: from a small image's decode (~ms) to a 4K frame queued behind a full batch
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# seconds: a short clip on a GPU to a long one on a CPU
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sgz_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sgz_request_duration_seconds",
            "End-to-end request latency, arrival to last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "sgz_queue_wait_seconds",
            "Time queued before the request's forward pass started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "sgz_inference_seconds",
            "Forward pass time per batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "sgz_decode_seconds",
            "Image decode time per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encode = Histogram(
            "sgz_encode_seconds",
            "Image encode time per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.coded = Counter(
            "sgz_images_coded",
            "Images decoded and encoded, by stage (decode, encode) and device (gpu, cpu)",
            ["stage", "device"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sgz_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("sgz_queue_depth", "Images waiting for a forward pass", registry=r)
        self.in_flight = Gauge("sgz_in_flight_requests", "HTTP requests being handled", registry=r)
        self.images = Counter("sgz_images_processed", "Images through a forward pass", registry=r)
        self.megapixels = Counter(
            "sgz_megapixels_processed", "Megapixels through a forward pass", registry=r
        )
        self.dropped = Counter(
            "sgz_requests_dropped",
            "Queued requests never computed, by reason (deadline, disconnected)",
            ["reason"],
            registry=r,
        )
        self.video_frames = Counter(
            "sgz_video_frames", "Video frames through the model (video jobs)", registry=r
        )
        self.job_duration = Histogram(
            "sgz_job_duration_seconds",
            "Video job run time, start to finish, by final state",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge("sgz_jobs", "Video jobs known, by state", ["state"], registry=r)
        self.trimmed = Counter(
            "sgz_memory_trimmed_bytes",
            "Memory given back to the kernel when idle (service/memory.py)",
            registry=r,
        )
        self.trims = Counter(
            "sgz_memory_trims",
            "Idle spells in which freed memory was handed back (malloc_trim)",
            registry=r,
        )
        self.model = Info("sgz_model", "The served model: checkpoint, device, versions", registry=r)

    def observe_batch(self, size: int, pixels: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)
        self.megapixels.inc(pixels / 1e6)

    def observe_trim(self, given_back: int) -> None:
        self.trims.inc()
        self.trimmed.inc(given_back)

    def describe_model(self, sha256: str, source: str, device: str, versions: dict) -> None:
        self.model.info(
            {
                "checkpoint_sha256": sha256,
                "checkpoint_source": source,
                "device": device,
                "python_version": platform.python_version(),
                **{f"{k}_version": v for k, v in versions.items()},
            }
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
