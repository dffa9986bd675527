"""End to end, as a hostile or careless client would try it: factor maps no one else can read
or replace, factor answers that stay small unless asked and stream when large, the security
headers, opt-in CORS, /readyz without the hash, unknown SGZ_* variables, HEAD, and a foreign
pickle's one-line refusal.

Two servers: `server` with the defaults, `guarded` with an API key, one CORS origin and a
misspelt variable (SGZ_MAX_BACH_SIZE).
"""

import base64
import hashlib
import io
import os
import pickle
import re
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest
from sgz_server import BROWSER, FACTOR_ATOL, SGZ, Server, assert_error, photo

from bench.servers import free_port
from model import upsample_factor
from model.imageio import decode_image

KEY = "k3y-for-the-guarded-server"
AUTH = {"X-API-Key": KEY}
ORIGIN = "https://app.example.com"
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def server():
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def guarded():
    with Server(
        {
            "SGZ_API_KEY": KEY,
            "SGZ_CORS_ORIGINS": f"{ORIGIN}, http://localhost:3000",
            "SGZ_MAX_BACH_SIZE": "4",
        }
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def lowres_factor(enhancer, source: bytes):
    """The map /enhance stores for this image: (3, h, w) at EFE's resolution."""
    return enhancer.enhance(decode_image(source).to_tensor(), return_factor=True)[1][0]


def test_another_client_cannot_read_or_replace_a_factor_map(client, published_enhancer):
    mine, theirs = photo((512, 512)).read_bytes(), photo((1920, 1080)).read_bytes()
    a = client.post("/enhance", content=mine, headers={**PNG, "X-Request-ID": "shared-id"})
    assert a.status_code == 200 and a.headers["x-request-id"] == "shared-id"  # logs still
    factor_id = a.headers["x-factor-id"]
    # B sends A's request id, to both endpoints that store a map: each gets a map of its own
    b = client.post("/enhance", content=theirs, headers={**PNG, "X-Request-ID": "shared-id"})
    b2 = client.post("/factor", content=theirs, headers={**PNG, "X-Request-ID": "shared-id"})
    assert len({factor_id, b.headers["x-factor-id"], b2.headers["x-factor-id"]}) == 3
    # the request id names nothing, and A's id still gives A's map
    assert_error(client.get("/factor/shared-id"), 404, "unknown_factor_id")
    got = np.load(io.BytesIO(client.get(f"/factor/{factor_id}", params={"format": "npy"}).content))
    expected = lowres_factor(published_enhancer, mine).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=FACTOR_ATOL)


def test_factor_ids_are_unguessable(client):
    source = photo((512, 512)).read_bytes()
    ids = [
        client.post("/factor", content=source, headers={**PNG, "X-Request-ID": "same"}).headers[
            "x-factor-id"
        ]
        for _ in range(12)
    ]
    assert len(set(ids)) == len(ids)
    for factor_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", factor_id), factor_id
        assert len(base64.urlsafe_b64decode(factor_id)) * 8 >= 192  # random bits
    # no shared prefix or counter: every position varies across a dozen ids
    assert all(len({i[k] for i in ids}) > 1 for k in range(32))


def test_factor_npy_is_efe_sized_unless_full_size_is_asked(client, published_enhancer):
    source = photo((3840, 2160)).read_bytes()
    r = client.post("/enhance", content=source, headers=PNG, params={"format": "jpeg"})
    assert r.status_code == 200, r.text
    factor_id, low = r.headers["x-factor-id"], lowres_factor(published_enhancer, source)

    small = client.get(f"/factor/{factor_id}", params={"format": "npy"})
    x_r = np.load(io.BytesIO(small.content))
    assert x_r.shape == (180, 320, 3) and x_r.dtype == np.float32  # 4K / 12
    assert int(small.headers["content-length"]) < 700_000  # documented: 0.7 MB
    np.testing.assert_allclose(x_r, low.permute(1, 2, 0).numpy(), atol=FACTOR_ATOL)

    full = client.get(f"/factor/{factor_id}", params={"format": "npy", "size": "full"})
    assert full.status_code == 200 and "transfer-encoding" not in full.headers
    assert int(full.headers["content-length"]) == len(full.content) == 99_532_928
    x_r = np.load(io.BytesIO(full.content))
    assert x_r.shape == (2160, 3840, 3) and x_r.dtype == np.float32
    expected = upsample_factor(low[None], (2160, 3840))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(x_r, expected, atol=FACTOR_ATOL)
    del x_r, expected, full

    picture = client.get(f"/factor/{factor_id}", params={"size": "efe"})
    assert decode_image(picture.content).size == (320, 180)


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled_reader(port: int, path: str) -> socket.socket:
    """A client that asks for an answer, takes its first bytes and then reads no more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room in the kernel
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    sock.settimeout(60)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    return sock


def test_slow_readers_of_full_size_maps_pin_little_memory(server, client):
    """Four clients that stop reading a 4K full-size npy (99.5 MB each) held ~400 MB when the
    answer was built whole; streamed, each holds about a strip."""
    r = client.post("/factor", content=photo((3840, 2160)).read_bytes(), headers=PNG)
    path = f"/factor/{r.headers['x-factor-id']}?format=npy&size=full"
    assert len(client.get(path).content) == 99_532_928  # once, so that pools exist
    time.sleep(1)
    before = rss(server.proc.pid)
    readers = [stalled_reader(server.port, path) for _ in range(4)]
    try:
        time.sleep(3)
        grown = rss(server.proc.pid) - before
        assert grown < 64 * 2**20, f"{grown / 2**20:.0f} MB held for 4 stalled readers"
        assert client.get("/healthz").status_code == 200
    finally:
        for sock in readers:
            sock.close()


def assert_secured(r: httpx.Response):
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_security_headers_on_every_answer(client, guarded):
    answers = [
        client.get("/healthz"),
        client.get("/factor/nope"),
        client.get("/openapi.json"),
        client.post("/enhance", content=b"text", headers=PNG),
        client.post("/enhance", params={"strength": 2}),
        client.delete("/healthz"),
        httpx.get(f"{guarded.url}/metrics"),
        httpx.get(f"{guarded.url}/readyz"),
    ]
    assert [r.status_code for r in answers] == [200, 404, 200, 415, 422, 405, 401, 200]
    for r in answers:
        assert_secured(r)
        assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_docs_page_policy_allows_exactly_what_swagger_ui_needs(server, client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert_secured(docs)
    policy = dict(
        part.strip().split(" ", 1) for part in docs.headers["content-security-policy"].split(";")
    )
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.DOTALL)
    assert inline, "Swagger UI is started by an inline script"
    for script in inline:  # what a browser checks before running it
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy["script-src"].split()
    assert "'unsafe-inline'" not in policy["script-src"]
    assert "'unsafe-eval'" not in policy["script-src"]
    assert not re.search(r"\son\w+\s*=", docs.text)  # no inline handlers (they would be blocked)
    for asset in re.findall(r'(?:src|href)="([^"]+)"', docs.text):
        assert asset.startswith("/")  # 'self'
        r = client.get(asset)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    assert policy["default-src"] == "'self'"  # Swagger UI fetches /openapi.json from here
    if BROWSER:  # as a browser enforces it: Swagger UI still draws every endpoint
        shown = subprocess.run(
            [
                BROWSER,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=15000",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
                f"{server.url}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert 'data-path="/factor/{factor_id}"' in shown.stdout, shown.stderr[-2000:]
        assert "Content Security Policy" not in shown.stderr, shown.stderr[-2000:]


def test_cors_is_off_by_default_and_on_for_the_configured_origins(server, guarded):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }
    off = [
        httpx.options(f"{server.url}/enhance", headers=preflight),
        httpx.get(f"{server.url}/healthz", headers={"Origin": ORIGIN}),
    ]
    for r in off:
        assert not any(h.startswith("access-control-") for h in r.headers), r.headers

    # preflights carry no key: answered before the key is asked for
    ok = httpx.options(f"{guarded.url}/enhance", headers=preflight)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "x-api-key" in ok.headers["access-control-allow-headers"].lower()
    assert_secured(ok)
    r = httpx.post(
        f"{guarded.url}/enhance",
        content=photo((512, 512)).read_bytes(),
        headers={**PNG, **AUTH, "Origin": ORIGIN},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-factor-id"} <= exposed

    refused = httpx.options(
        f"{guarded.url}/enhance", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert_error(refused, 400, "cors_refused")
    assert "access-control-allow-origin" not in refused.headers
    stranger = httpx.get(f"{guarded.url}/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in stranger.headers


def test_readyz_shows_the_checkpoint_hash_only_with_the_key(guarded, published_enhancer):
    anonymous = httpx.get(f"{guarded.url}/readyz").json()
    assert anonymous["status"] == "ready" and "checkpoint_sha256" not in anonymous
    assert published_enhancer.sha256 not in httpx.get(f"{guarded.url}/readyz").text
    keyed = httpx.get(f"{guarded.url}/readyz", headers=AUTH).json()
    assert keyed["checkpoint_sha256"] == published_enhancer.sha256
    wrong = httpx.get(f"{guarded.url}/readyz", headers={"X-API-Key": "guess"}).json()
    assert "checkpoint_sha256" not in wrong


def test_unknown_sgz_variables_are_named_at_startup(guarded):
    warnings = [line for line in guarded.log().splitlines() if "SGZ_MAX_BACH_SIZE" in line]
    assert len(warnings) == 1, guarded.log()[-2000:]
    assert "WARNING" in warnings[0] and "did you mean SGZ_MAX_BATCH_SIZE?" in warnings[0]
    assert "SGZ_CORS_ORIGINS" not in warnings[0] and "SGZ_API_KEY" not in warnings[0]


def test_head_is_answered_wherever_get_is(client):
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-length"] == get.headers["content-length"], path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert_secured(head)
    r = client.post("/factor", content=photo((512, 512)).read_bytes(), headers=PNG)
    head = client.head(
        f"/factor/{r.headers['x-factor-id']}", params={"format": "npy", "size": "full"}
    )
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == 128 + 512 * 512 * 3 * 4
    assert client.head("/enhance").status_code == 405  # POST only, as before
    assert client.head("/factor/nope").status_code == 404


def test_a_foreign_pickle_is_refused_in_one_line(tmp_path):
    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))  # not torch.save
    result = subprocess.run(
        [
            str(SGZ),
            "serve",
            "--port",
            str(free_port()),
            "--device",
            "cpu",
            "--checkpoint",
            str(foreign),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sgz serve: cannot load the model: checkpoint {foreign}: not a PyTorch checkpoint "
        "(a pickle torch.load cannot read)"
    ], result.stderr
