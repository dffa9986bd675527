"""End to end, over raw sockets: idle and slow clients are cut off, connections beyond the cap
are refused cleanly, malformed or ambiguous HTTP gets our JSON error, and SIGTERM under load
drains without resetting anyone (issue 21).

`quick` runs with 1-2 s deadlines; every wait below allows MARGIN more, for a loaded 2-core
machine: the tests check that the server gives up, never how fast. `capped` holds at most
CAP connections; its last test stops it.
"""

import io
import json
import resource
import select
import signal
import socket
import threading
import time
from contextlib import ExitStack

import httpx
import psutil
import pytest
from PIL import Image
from sgz_server import Server

from service.server import FD_RESERVE, connection_cap

MARGIN = 20.0
TIMEOUT_S = 2.0  # header, body and write deadlines of `quick`
KEEPALIVE_S = 1.0
CAP = 32
SWAGGER_JS = "/static-offline-docs/swagger-ui-bundle.js"  # the largest answer at hand: 1.5 MB


@pytest.fixture(scope="module")
def quick():
    with Server(
        {
            "SGZ_HEADER_TIMEOUT_S": str(TIMEOUT_S),
            "SGZ_BODY_TIMEOUT_S": str(TIMEOUT_S),
            "SGZ_WRITE_TIMEOUT_S": str(TIMEOUT_S),
            "SGZ_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
        }
    ) as s:
        yield s


@pytest.fixture(scope="module")
def capped():
    # a soft open-files limit under the hard one, as systemd sets it: `sgz serve` must raise it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = soft == hard and hard > 1024
    if lowered:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        s = Server(
            {
                "SGZ_MAX_CONNECTIONS": str(CAP),
                "SGZ_HEADER_TIMEOUT_S": "120",
                "SGZ_SHUTDOWN_GRACE_S": "4",
                "SGZ_MAX_WAIT_MS": "200",
                "SGZ_EARLY_DISPATCH": "false",
            }
        )
    finally:
        if lowered:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield s.wait_ready()
    finally:
        s.close()


def connect(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connecting, so that the window the server sees stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (True) or `limit` s pass (False)."""
    end, data = time.monotonic() + limit, b""
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_json_error(data: bytes, status: int, error: str) -> dict[str, str]:
    got, headers, body = parse(data)
    assert got == status, data[:500]
    assert headers["content-type"] == "application/json", headers
    assert json.loads(body)["error"] == error and json.loads(body)["detail"], body
    assert "server" not in headers  # uvicorn is not advertised
    assert headers["x-content-type-options"] == "nosniff"  # as on the app's answers
    return headers


def test_idle_connections_are_closed(quick):
    with ExitStack() as stack:
        fresh = [stack.enter_context(connect(quick)) for _ in range(20)]  # never send a byte
        kept = stack.enter_context(connect(quick))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, closed = read_until_closed(kept, KEEPALIVE_S + MARGIN)
        assert closed and parse(data)[0] == 200  # answered, then closed once idle
        for sock in fresh:
            data, closed = read_until_closed(sock, TIMEOUT_S + MARGIN)
            assert closed and data == b""  # nothing asked, nothing answered


def test_slowloris_headers_get_408(quick):
    with connect(quick) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        end, data = time.monotonic() + TIMEOUT_S + MARGIN, b""
        for i in range(1000):  # a header line every 0.2 s, until the server answers
            sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            if select.select([sock], [], [], 0.2)[0] or time.monotonic() > end:
                break
        data, closed = read_until_closed(sock, MARGIN)
    assert closed
    assert_json_error(data, 408, "request_timeout")


@pytest.mark.parametrize("trickle", [False, True], ids=["short", "trickle"])
def test_slow_or_short_body_gets_408(quick, trickle):
    """Content-Length promises more than comes: all at once and then nothing, or a byte
    every 0.2 s (too slow for SGZ_MIN_TRANSFER_RATE)."""
    with connect(quick) as sock:
        sock.sendall(
            b"POST /enhance HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n\x89PNG"
        )
        end = time.monotonic() + TIMEOUT_S + MARGIN
        while trickle and time.monotonic() < end:
            sock.sendall(b"x")
            if select.select([sock], [], [], 0.2)[0]:
                break
        data, closed = read_until_closed(sock, TIMEOUT_S + MARGIN)
    assert closed
    assert_json_error(data, 408, "request_timeout")
    assert httpx.get(f"{quick.url}/healthz").status_code == 200


def server_side_open(server, client_port: int) -> bool:
    """Whether the server still holds its end of the connection from `client_port`."""
    return any(
        c.raddr and c.raddr.port == client_port
        for c in psutil.Process(server.proc.pid).net_connections(kind="tcp")
    )


def server_side_closed(server, client_port: int, deadline: float) -> bool:
    """Whether the server lets go of the connection from `client_port` before `deadline`: seen
    gone in three checks in a row, since one read of /proc/net/tcp while other sockets come and
    go can miss a socket that is still there (a closed one never comes back)."""
    gone = 0
    while gone < 3 and time.monotonic() < deadline:
        gone = 0 if server_side_open(server, client_port) else gone + 1
        time.sleep(0.2)
    return gone == 3


def test_a_client_that_stops_reading_is_cut_off(quick):
    size = len(httpx.get(quick.url + SWAGGER_JS).content)
    copies = 16  # far more than the kernel's buffers hold, so the server has to wait on us
    with connect(quick, rcvbuf=4096) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % SWAGGER_JS.encode() * copies)
        port, end = sock.getsockname()[1], time.monotonic() + TIMEOUT_S + MARGIN
        # never reading
        assert server_side_closed(quick, port, end), "still waiting on a client that never reads"
        data, closed = read_until_closed(sock, MARGIN)
    assert closed and len(data) < copies * size
    assert httpx.get(f"{quick.url}/healthz").status_code == 200


POST = b"POST /enhance HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
BAD_REQUESTS = {
    "cl_and_te": (
        400,
        "bad_request",
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    "te_and_cl": (
        400,
        "bad_request",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    "two_lengths": (
        400,
        "bad_request",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
    ),
    "bad_length": (400, "bad_request", POST + b"Content-Length: 5x\r\n\r\nabcde"),
    "bad_chunk": (
        400,
        "bad_request",
        POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ),
    "no_host": (400, "bad_request", b"GET /healthz HTTP/1.1\r\n\r\n"),
    "nul_in_path": (400, "bad_request", b"GET /heal\x00thz HTTP/1.1\r\nHost: x\r\n\r\n"),
    "encoded_nul": (400, "bad_request", b"GET /factor/a%00b HTTP/1.1\r\nHost: x\r\n\r\n"),
    "huge_header": (
        431,
        "headers_too_large",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    ),
    "gzip_body": (501, "not_implemented", POST + b"Transfer-Encoding: gzip\r\n\r\n"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_malformed_or_ambiguous_http_gets_a_json_error(quick, name):
    status, error, request = BAD_REQUESTS[name]
    with connect(quick) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the huge header: answered and closed before all of it went out
        data, closed = read_until_closed(sock, MARGIN)
    assert closed
    headers = assert_json_error(data, status, error)
    assert headers["connection"] == "close"


def test_no_server_header(quick):
    r = httpx.get(f"{quick.url}/healthz")
    assert r.status_code == 200 and "server" not in r.headers


def test_connection_cap_keeps_below_the_open_files_limit():
    assert connection_cap(1000, 1_048_576) == 1000
    capped = connection_cap(100_000, 4096)
    assert 0 < capped < 4096 - FD_RESERVE
    assert 0 < connection_cap(1000, 200) < 200  # a tiny limit still leaves room for the rest


def test_the_soft_open_files_limit_is_raised(capped):
    limits = open(f"/proc/{capped.proc.pid}/limits").read()
    soft, hard = next(
        line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")
    )
    assert soft == hard, limits


def test_connections_beyond_the_cap_are_refused_cleanly(capped):
    log_lines = len(capped.log().splitlines())
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(capped)) for _ in range(CAP + 48)]
        # held connections stay silent; a refused one gets 503 at once, then EOF
        answered, end = set(), time.monotonic() + MARGIN
        while len(answered) < 48 and time.monotonic() < end:
            answered.update(select.select([s for s in socks if s not in answered], [], [], 1)[0])
        assert len(answered) >= 48
        for sock in answered:
            data, closed = read_until_closed(sock, MARGIN)
            assert closed
            assert_json_error(data, 503, "overloaded")
        r = httpx.get(f"{capped.url}/healthz", timeout=MARGIN)  # refused the same way
        assert r.status_code == 503 and r.json()["error"] == "overloaded"
    end = time.monotonic() + MARGIN
    while httpx.get(f"{capped.url}/healthz").status_code != 200:  # room again once they close
        assert time.monotonic() < end
        time.sleep(0.1)
    assert len(capped.log().splitlines()) - log_lines < 10, capped.log()[-3000:]


def small_png() -> bytes:
    out = io.BytesIO()
    Image.effect_noise((96, 64), 20).convert("RGB").save(out, "PNG")
    return out.getvalue()


def test_sigterm_under_load_answers_everyone(capped):
    """16 clients, each on its own kept-alive connection, keep posting images; SIGTERM comes
    mid-load. Every request gets a whole answer: 200, or 503 shutting_down with
    Connection: close. No reset, and /readyz says 503 at once."""
    png, results, errors, oks = small_png(), [], [], threading.Semaphore(0)
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=capped.url, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/enhance", content=png, headers={"content-type": "image/png"})
                except httpx.ConnectError:
                    return  # the listener has closed: nothing was sent
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    return
                results.append(r)
                if r.status_code != 200:
                    return
                oks.release()

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        for _ in range(32):  # load is on
            assert oks.acquire(timeout=60), "no answers under load"
        capped.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + MARGIN
        while (ready := httpx.get(f"{capped.url}/readyz", timeout=MARGIN)).status_code == 200:
            assert time.monotonic() < end
        for t in threads:
            t.join(60)
    finally:
        stop.set()
    assert not errors, errors
    assert ready.status_code == 503 and ready.json()["error"] == "shutting_down"
    assert ready.headers["connection"] == "close"
    refused = [r for r in results if r.status_code != 200]
    assert refused, "no request was answered 503 during the drain"
    for r in refused:
        assert r.status_code == 503 and r.json()["error"] == "shutting_down", r.text
        assert r.headers["connection"] == "close"
    for r in results:
        if r.status_code == 200:
            assert Image.open(io.BytesIO(r.content)).size == (96, 64)  # whole answers
    assert capped.proc.wait(MARGIN + 30) in (0, -signal.SIGTERM)
    log = capped.log()
    assert "draining" in log and "Traceback" not in log, log[-3000:]
