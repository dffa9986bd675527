"""The load client, run as its own process so that it never shares an interpreter (or a GIL)
with the server it measures. `concurrency` workers each keep one request in flight: POST a JPEG
or PNG as multipart field `image`, wait for the answer (an image of the same format), send the
next. Prints one JSON object.

Each worker speaks HTTP/1.1 over its own keep-alive connection, with every request's bytes built
once up front: the client shares the server's cores, and httpx (~5 ms of CPU per 2 MB PNG round
trip) took a tenth of a 2-core machine from the servers it measured.

    python -m bench.load_client --url http://127.0.0.1:8000/enhance --images DIR \
        --concurrency 8 --duration 10
"""

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# servers close kept-alive connections left idle (uvicorn after 5 s): one that waited this long
# in the pool (between warm-up and load) is reopened instead of reused
REOPEN_IDLE_S = 2.0
TIMEOUT_S = 300  # a request unanswered this long counts as failed (TimeoutError)
MAGIC = {".jpg": b"\xff\xd8", ".png": b"\x89PNG"}
MEDIA = {".jpg": "image/jpeg", ".png": "image/png"}


def request(url: str, suffix: str, data: bytes) -> bytes:
    """One multipart POST of `data` as field `image`, whole, ready to write."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    boundary = os.urandom(16).hex()
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="photo{suffix}"\r\nContent-Type: {MEDIA[suffix]}\r\n\r\n'.encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after the server closes it."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.used = 0.0  # when the last answer ended

    async def post(self, raw: bytes) -> tuple[int, bytes]:
        stale = time.perf_counter() - self.used > REOPEN_IDLE_S
        if self.streams is not None and (stale or self.streams[0].at_eof()):
            self.close()  # as httpx does: never race the server's close of an idle connection
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        reader, writer = self.streams
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = await self.chunked(reader)
            else:  # delimited by the close
                body = await reader.read(-1)
                headers["connection"] = "close"
        except BaseException:
            self.close()
            raise
        if headers.get("connection") == "close":
            self.close()
        self.used = time.perf_counter()
        return status, body

    @staticmethod
    async def chunked(reader: asyncio.StreamReader) -> bytes:
        pieces = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return b"".join(pieces)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


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
    requests = [(suffix, request(url, suffix, data)) for suffix, data in images]
    where = urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    idle = [Connection(host, port) for _ in range(concurrency)]

    async def one() -> tuple[float, int | str, bool]:
        suffix, raw = requests[next(counter) % len(requests)]
        conn = idle.pop() if idle else Connection(host, port)
        t0 = time.perf_counter()
        try:
            status, body = await asyncio.wait_for(conn.post(raw), TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            return time.perf_counter() - t0, type(e).__name__, False
        finally:
            idle.append(conn)
        ok = status == 200 and body.startswith(MAGIC[suffix])  # same format back
        return time.perf_counter() - t0, status, ok

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
    for conn in idle:
        conn.close()
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
