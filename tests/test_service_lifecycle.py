"""End to end: a client that hangs up while queued, the worker threads' priority, and a graceful
shutdown with work queued.

A 1.5 s batch timer (always waited for: SGZ_EARLY_DISPATCH=false) keeps requests queued long
enough to act on them; the module's last test shuts the server down.
"""

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from sgz_server import Server, assert_error, metric, photo

from model.imageio import decode_image


@pytest.fixture(scope="module")
def server():
    s = Server(
        {
            "SGZ_MAX_WAIT_MS": "1500",
            "SGZ_EARLY_DISPATCH": "false",
            "SGZ_MAX_BATCH_SIZE": "8",
            "SGZ_WORKER_NICE": "7",
            "SGZ_IO_THREADS": "2",
        }
    )
    try:
        yield s.wait_ready()
    finally:
        s.close()


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def wait_for_queue(server, depth: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while metric(metrics(server), "sgz_queue_depth") != depth:
        assert time.monotonic() < end, f"queue never reached {depth}"
        time.sleep(0.02)


def test_client_that_hung_up_is_dropped_before_its_batch_runs(server):
    source = photo((512, 512)).read_bytes()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /enhance HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(source), source)
    )
    wait_for_queue(server, 1)
    sock.close()  # gone while its request waits for the batch timer
    r = httpx.post(
        f"{server.url}/enhance", content=source, timeout=30, headers={"content-type": "image/png"}
    )  # same size: same batch
    assert r.status_code == 200
    text = metrics(server)
    assert metric(text, "sgz_requests_dropped_total", reason="disconnected") == 1
    assert metric(text, "sgz_images_processed_total") == 1
    assert metric(text, "sgz_batch_size_count") == 1


def thread_nices(pid: int) -> dict[int, int]:
    """nice value of every thread of a process, by thread id (field 19 of /proc/.../stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        out[int(task.name)] = int(stat[stat.rindex(")") + 2 :].split()[16])
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_worker_threads_run_below_the_event_loop(server):
    r = httpx.post(
        f"{server.url}/enhance",
        content=photo((512, 512)).read_bytes(),
        timeout=30,
        headers={"content-type": "image/png"},
    )  # the decode and encode threads start
    assert r.status_code == 200
    nices = thread_nices(server.proc.pid)
    assert nices[server.proc.pid] == 0  # the main thread runs the event loop
    # at least the decode, inference and encode threads, plus numba's pool started from the
    # inference thread (they inherit its priority)
    assert sum(n == 7 for n in nices.values()) >= 4, nices


def test_sigterm_finishes_queued_requests_then_exits(server, published_enhancer):
    source = photo((512, 512)).read_bytes()
    expected = published_enhancer.enhance(decode_image(source).to_tensor())

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            queued = [
                asyncio.create_task(
                    c.post("/enhance", content=source, headers={"content-type": "image/png"})
                )
                for _ in range(3)
            ]
            await asyncio.to_thread(wait_for_queue, server, 3)
            server.proc.send_signal(signal.SIGTERM)
            # once the signal is seen, new requests get 503 while the queued ones finish
            for _ in range(100):
                async with httpx.AsyncClient(timeout=10) as fresh:
                    fresh_answer = await fresh.get(f"{server.url}/healthz")
                if fresh_answer.status_code != 200:
                    break
                await asyncio.sleep(0.05)
            return await asyncio.gather(*queued), fresh_answer

    responses, fresh_answer = asyncio.run(scenario())
    assert_error(fresh_answer, 503, "shutting_down")
    assert fresh_answer.headers["connection"] == "close"
    for r in responses:
        assert r.status_code == 200, r.text
        got = decode_image(r.content).to_tensor()
        assert (got.int() - expected.int()).abs().max().item() <= 1
    assert server.proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    log = server.log()
    assert "finishing" in log and "Application shutdown complete" in log, log
