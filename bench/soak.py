"""A soak of the real service: many requests at high concurrency, mixed sizes and formats,
slow uploaders and slow readers mixed in; every answer checked; RSS idle, peak, after.

    python -m bench.soak [--requests 10000] [--concurrency 64] [--shared ../shared]

Starts `sgz serve` (the default checkpoint, CPU) on a free port, warms it, then runs the mix:
60% 600x400 JPEG, 28% 1200x900 JPEG, 8% 1920x1080 PNG, 2% 3840x2160 JPEG, with 1% of the
requests uploading at ~64 KB/s and 1% reading their answer at ~64 KB/s. Counts: 200s whose
body decodes at the sent size, other statuses, and lost requests (transport errors). Exits 1
when any request was lost or answered 5xx.
"""

import argparse
import asyncio
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from PIL import Image

from .servers import RssSampler, ServerProcess, tree_rss
from .video_clips import default_shared

MIX = (
    (0.60, (600, 400), "JPEG"),
    (0.28, (1200, 900), "JPEG"),
    (0.08, (1920, 1080), "PNG"),
    (0.02, (3840, 2160), "JPEG"),
)
SLOW_SHARE = 0.01  # of the requests, for each of slow upload and slow read
SLOW_CHUNK, SLOW_PAUSE = 16 * 1024, 0.25  # ~64 KB/s


def images(shared: Path) -> list[tuple[float, tuple, str, bytes]]:
    photos = sorted((shared / "data" / "sice-real").glob("*.png"))
    out = []
    for share, size, fmt in MIX:
        src = next(p for p in photos if Image.open(p).size == (1920, 1080))
        im = Image.open(src).convert("RGB").resize(size)
        buf = io.BytesIO()
        im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
        out.append((share, size, fmt, buf.getvalue()))
    return out


async def trickle(data: bytes):
    for i in range(0, len(data), SLOW_CHUNK):
        yield data[i : i + SLOW_CHUNK]
        await asyncio.sleep(SLOW_PAUSE)


async def one(client, url, item, rng, tally, latencies):
    _, size, fmt, data = item
    kind = rng.random()
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    body = trickle(data) if kind < SLOW_SHARE else data
    start = time.perf_counter()
    try:
        async with client.stream(
            "POST", url + "/enhance?format=jpeg", content=body, headers={"Content-Type": mime}
        ) as r:
            chunks = []
            async for chunk in r.aiter_bytes(SLOW_CHUNK):
                chunks.append(chunk)
                if SLOW_SHARE <= kind < 2 * SLOW_SHARE:
                    await asyncio.sleep(SLOW_PAUSE)
    except httpx.HTTPError as e:
        tally[f"lost: {type(e).__name__}"] += 1
        return
    latencies.append(time.perf_counter() - start)
    if r.status_code != 200:
        tally[f"status {r.status_code}"] += 1
        return
    ok = Image.open(io.BytesIO(b"".join(chunks))).size == size
    tally["200" if ok else "200 with a wrong image"] += 1


async def soak(url: str, items, requests: int, concurrency: int, seed: int) -> dict:
    rng, tally, latencies = random.Random(seed), Counter(), []
    weights = [share for share, *_ in items]
    picks = rng.choices(items, weights, k=requests)
    queue = iter(picks)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:

        async def worker():
            for item in queue:
                await one(client, url, item, rng, tally, latencies)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "tally": dict(tally),
        "seconds": seconds,
        "per_s": requests / seconds,
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "p99_s": latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--shared", type=Path, default=default_shared())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    a = ap.parse_args(argv)
    from model import DEFAULT_CHECKPOINT

    items = images(a.shared)
    with tempfile.TemporaryDirectory(prefix="sgz-soak-") as logs:
        server = ServerProcess("sgz", str(DEFAULT_CHECKPOINT), Path(logs))
        try:
            server.wait_ready(180)
            asyncio.run(soak(server.url, items, 64, 8, a.seed + 1))  # warm: buffers, pools
            time.sleep(3)
            idle = tree_rss(psutil.Process(server.proc.pid))
            with RssSampler(server.proc.pid) as rss:
                result = asyncio.run(soak(server.url, items, a.requests, a.concurrency, a.seed))
            after = tree_rss(rss.proc)
            time.sleep(5)  # SGZ_TRIM_IDLE_S (2 s) and a check
            result.update(
                requests=a.requests,
                concurrency=a.concurrency,
                rss_mb={
                    "idle": idle / 2**20,
                    "peak": rss.peak / 2**20,
                    "after": after / 2**20,
                    "after_idle": tree_rss(rss.proc) / 2**20,
                },
            )
        finally:
            server.stop()
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    bad = sum(v for k, v in result["tally"].items() if k.startswith(("lost", "status 5")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
