"""Memory comes back when the service goes idle (service/memory.py): a real server's RSS after
a burst of 4K images, measured from /proc, falls once no batch has run for SGZ_TRIM_IDLE_S."""
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from PIL import Image

from sgz_server import Server, metric, photo


@pytest.fixture(scope="module")
def server():
    with Server({"SGZ_TRIM_IDLE_S": "1"}) as s:
        yield s


def jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.open(photo(size)).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_burst_of_large_images_is_given_back_when_idle(server):
    proc = psutil.Process(server.proc.pid)
    data = jpeg((3840, 2160))
    with httpx.Client(base_url=server.url, timeout=120) as c, ThreadPoolExecutor(4) as pool:
        # counted from before the burst: on a loaded machine a trim may come during it, or
        # between the last batch and the last answer
        before = metric(c.get("/metrics").text, "sgz_memory_trimmed_bytes_total")
        codes = list(pool.map(lambda _: c.post("/enhance", files={"image": ("a.jpg", data)})
                              .status_code, range(12)))
        assert codes == [200] * 12
        peak = proc.memory_info().rss
        time.sleep(4)  # idle 1 s, checked every 0.5 s: the trim after the burst
        trimmed = metric(c.get("/metrics").text, "sgz_memory_trimmed_bytes_total") - before
    assert trimmed > 16 * 2**20  # the 4K buffers freed after the burst went back
    assert proc.memory_info().rss < peak
