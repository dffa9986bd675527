"""The load client, run as its own process so that it never shares an interpreter (or a GIL)
with the server it measures. `concurrency` workers each keep one request in flight: POST a JPEG
or PNG as multipart field `image`, wait for the answer (an image of the same format), send the
next. Prints one JSON object.

    python -m bench.load_client --url http://127.0.0.1:8000/enhance --images DIR \
        --concurrency 8 --duration 10
"""

import argparse
import asyncio
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


MAGIC = {".jpg": b"\xff\xd8", ".png": b"\x89PNG"}
MEDIA = {".jpg": "image/jpeg", ".png": "image/png"}


async def run(
    url: str,
    images: list[tuple[str, bytes]],
    concurrency: int,
    duration: float,
    warmup_requests: int,
    keep_latencies: bool = False,
) -> dict:
    counter = itertools.count()
    latencies, statuses, bad = [], {}, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:

        async def one() -> tuple[float, int, bool]:
            suffix, data = images[next(counter) % len(images)]
            t0 = time.perf_counter()
            try:
                r = await client.post(url, files={"image": ("photo" + suffix, data, MEDIA[suffix])})
            except httpx.HTTPError as e:
                return time.perf_counter() - t0, f"{type(e).__name__}", False
            ok = r.status_code == 200 and r.content.startswith(MAGIC[suffix])  # same format back
            return time.perf_counter() - t0, r.status_code, ok

        # warm-up: connections opened, server-side first-call costs paid, not measured
        await asyncio.gather(*(one() for _ in range(warmup_requests)))
        start = time.perf_counter()
        deadline = start + duration

        async def worker():
            nonlocal bad
            while time.perf_counter() < deadline:
                seconds, status, ok = await one()
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if ok:
                    latencies.append(seconds)
                else:
                    bad += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    result = summary(concurrency, elapsed, latencies, statuses)
    result["failed"] = bad
    return {**result, "latencies_s": latencies} if keep_latencies else result


def summary(concurrency: int, elapsed: float, latencies: list[float], statuses: dict) -> dict:
    return {
        "concurrency": concurrency,
        "duration_s": elapsed,
        "ok": len(latencies),
        "failed": 0,
        "statuses": statuses,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--images", required=True, help="folder of .jpg / .png files to send, in turn")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="unmeasured requests first (default: the concurrency)",
    )
    p.add_argument(
        "--latencies", action="store_true", help="also print every latency (s), to merge clients"
    )
    args = p.parse_args()
    images = [
        (f.suffix, f.read_bytes()) for f in sorted(Path(args.images).iterdir()) if f.suffix in MAGIC
    ]
    if not images:
        sys.exit(f"load_client: no .jpg or .png files in {args.images}")
    warm = args.concurrency if args.warmup_requests is None else args.warmup_requests
    result = asyncio.run(
        run(args.url, images, args.concurrency, args.duration, warm, args.latencies)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
