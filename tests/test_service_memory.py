"""Memory comes back when the service goes idle (service/memory.py): a real server's RSS after
a burst of 4K images, measured from /proc, falls once no batch has run for SGZ_TRIM_IDLE_S; and
under sustained load it stays bounded."""

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from conftest import SHARED
from PIL import Image
from sgz_server import Server, metric, photo

from bench import load_client
from bench.http_cases import Case, write_case
from bench.servers import RssSampler
from model.checkpoint import DEFAULT_CHECKPOINT


@pytest.fixture(scope="module")
def server():
    with Server({"SGZ_TRIM_IDLE_S": "1"}) as s:
        yield s


def jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.open(photo(size)).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_burst_of_large_images_is_given_back_when_idle(server):
    """After the burst the service trims once it is idle, and RSS ends well under the burst's
    peak. (How much a trim itself returns varies: glibc may already have unmapped the largest
    buffers on free; what it kept in its heaps is what the trim returns: 2-60 MB here.)"""
    proc = psutil.Process(server.proc.pid)
    data = jpeg((3840, 2160))
    with (
        httpx.Client(base_url=server.url, timeout=120) as c,
        ThreadPoolExecutor(4) as pool,
        RssSampler(proc.pid) as rss,
    ):
        # counted from before the burst: on a loaded machine a trim may come during it, or
        # between the last batch and the last answer
        before = metric(c.get("/metrics").text, "sgz_memory_trims_total")
        codes = list(
            pool.map(
                lambda _: c.post("/enhance", files={"image": ("a.jpg", data)}).status_code,
                range(12),
            )
        )
        assert codes == [200] * 12
        time.sleep(4)  # idle 1 s, checked every 0.5 s: the trim after the burst
        trims = metric(c.get("/metrics").text, "sgz_memory_trims_total") - before
    assert trims >= 1
    assert proc.memory_info().rss < rss.peak


def test_sustained_load_on_the_fastest_path_stays_bounded(tmp_path):
    """Ten seconds of 32 clients on the fastest path (the network alone, 1200x900 JPEG, the
    default checkpoint with its level gain: the most batches, the most churn of multi-MB
    buffers) stay under 1.5 GB resident. A torch op in the numba backend's level gain once
    made glibc's heaps hold 2.9 GB here (0.8 GB without it: docs/service.md, "Memory, and a
    soak"); after the load, the idle trim gives memory back."""
    write_case(SHARED, Case("jpeg", "1200x900"), tmp_path)
    images = [(f.suffix, f.read_bytes()) for f in sorted(tmp_path.glob("*.jpg"))]
    with Server({"SGZ_TRIM_IDLE_S": "1"}, DEFAULT_CHECKPOINT) as s, RssSampler(s.proc.pid) as rss:
        url = f"{s.url}/enhance?denoise=0&exposure=model"
        result = asyncio.run(load_client.run(url, images, 32, 10.0, 32))
        assert result["failed"] == 0 and result["ok"] > 100
        time.sleep(4)  # idle 1 s, checked every 0.5 s: the trim after the load
        trims = metric(httpx.get(f"{s.url}/metrics").text, "sgz_memory_trims_total")
        after = psutil.Process(s.proc.pid).memory_info().rss
    assert rss.peak < 1.5 * 2**30, f"peak RSS {rss.peak / 2**20:.0f} MB"
    assert trims >= 1 and after < rss.peak
