"""Several replicas on one host, as docker-compose.replicas.yml runs them, without Docker: a real
redis-server, two `sgz serve` processes sharing it (SGZ_REDIS_URL) and Debian's nginx in front,
its config rendered from the template the compose file uses, all over real sockets."""

import asyncio
import io
import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import SICE
from PIL import Image
from sgz_server import Server, assert_error, metric

from bench.replicas_bench import NGINX_TEMPLATE, Nginx, RedisServer, binary
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MISSING = [b for b in ("redis-server", "nginx") if binary(b) is None]
needs_binaries = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {', '.join(MISSING)} (scripts/setup.sh installs the Debian packages as root)",
)
ENHANCED = "sgz_requests_total"


def jpegs(count: int) -> list[bytes]:
    """The shared 512x512 photos as JPEGs, what a phone would upload."""
    out = []
    for f in sorted(SICE.glob("*.png")):
        with Image.open(f) as im:
            if im.size == (512, 512):
                buf = io.BytesIO()
                im.convert("RGB").save(buf, "JPEG", quality=90)
                out.append(buf.getvalue())
    assert out, f"no 512x512 photos in {SICE}"
    return (out * (count // len(out) + 1))[:count]


def enhanced_count(server: Server) -> float:
    return metric(
        httpx.get(server.url + "/metrics").text, ENHANCED, endpoint="/enhance", status="200"
    )


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    """One jobs folder for both replicas: the shared volume of docker-compose.replicas.yml."""
    return tmp_path_factory.mktemp("shared-jobs")


@pytest.fixture(scope="module")
def fleet(jobs_dir):
    redis = RedisServer()
    # a 1 s grace: long enough for nginx to meet a 503 shutting_down, short for teardown
    env = {
        "SGZ_REDIS_URL": redis.url,
        "SGZ_IO_THREADS": "2",
        "SGZ_SHUTDOWN_GRACE_S": "1",
        "SGZ_JOBS_DIR": str(jobs_dir),
    }
    replicas = [Server(env) for _ in range(2)]
    front = None
    try:
        for r in replicas:
            r.wait_ready(180)  # two models loading at once on a small machine
        front = Nginx([f"127.0.0.1:{r.port}" for r in replicas])
        yield redis, replicas, front
    finally:
        if front is not None:
            front.close()
        for r in replicas:
            r.close()
        redis.close()


def test_compose_nginx_defines_every_placeholder_and_the_service_limits():
    compose = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    nginx, sgz = compose["services"]["nginx"], compose["services"]["sgz"]
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", NGINX_TEMPLATE.read_text()))
    assert placeholders and placeholders <= set(nginx["environment"])
    defaults = Settings.model_construct()
    for name in ("SGZ_MAX_UPLOAD_BYTES", "SGZ_MAX_VIDEO_UPLOAD_BYTES"):  # same for both
        assert nginx["environment"][name] == sgz["environment"][name]
        assert nginx["environment"][name].endswith(f":-{getattr(defaults, name[4:].lower())}}}")
    assert "ports" not in sgz and sgz["environment"]["SGZ_REDIS_URL"].startswith("redis://redis:")
    assert "resolve" in nginx["environment"]["SGZ_UPSTREAM_SERVERS"]  # follows --scale
    # video jobs go to every replica, as images do...
    upstreams = nginx["environment"]["SGZ_UPSTREAM_SERVERS"]
    assert nginx["environment"]["SGZ_JOBS_UPSTREAM_SERVERS"] == upstreams
    assert "server sgz-jobs:8000" in upstreams and "server sgz:8000" in upstreams
    assert compose["services"]["sgz-jobs"] == sgz
    # ...since every replica shares Redis and mounts one jobs volume, owned by the image's user
    jobs = sgz["environment"]["SGZ_JOBS_DIR"]
    assert f"jobs:{jobs}" in sgz["volumes"] and "jobs" in compose["volumes"]
    owner = compose["services"]["jobs-volume"]
    assert owner["command"][0] == "chown" and owner["volumes"] == [f"jobs:{jobs}"]
    uid = re.search(r"--uid (\d+)", (ROOT / "docker" / "Dockerfile").read_text())
    assert uid and owner["command"][1] == uid[1]
    done = {"condition": "service_completed_successfully"}
    assert sgz["depends_on"]["jobs-volume"] == done
    assert all(k[4:].lower() in Settings.model_fields for k in sgz["environment"])


@needs_binaries
def test_load_through_nginx_is_spread_over_both_replicas_without_errors(fleet):
    _, replicas, front = fleet
    before = [enhanced_count(r) for r in replicas]
    images, statuses = jpegs(150), []

    async def go():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=front.url, limits=limits, timeout=120) as client:
            gate = asyncio.Semaphore(16)

            async def one(data: bytes):
                async with gate:
                    r = await client.post(
                        "/enhance", files={"image": ("p.jpg", data, "image/jpeg")}
                    )
                    ok = r.content[:2] == b"\xff\xd8" and "x-factor-id" in r.headers
                    statuses.append(r.status_code if ok else f"{r.status_code}: {r.text[:200]}")

            await asyncio.gather(*map(one, images))

    asyncio.run(go())
    assert statuses == [200] * len(images), sorted(set(map(str, statuses)))
    served = [enhanced_count(r) - b for r, b in zip(replicas, before)]
    assert sum(served) == len(images) and min(served) > 0, served
    # nginx passes the client's X-Request-ID on, and the replica echoes it
    r = httpx.get(front.url + "/healthz", headers={"X-Request-ID": "scaleout-check-1"})
    assert r.headers["x-request-id"] == "scaleout-check-1"
    assert "rid=scaleout-check-1" in front.log()


@needs_binaries
def test_factor_maps_are_served_by_any_replica(fleet):
    _, replicas, front = fleet
    made = []  # (maker, id, npy, png) from the replica that made the map, asked directly
    for maker, data in zip(replicas * 2, jpegs(4)):
        r = httpx.post(
            maker.url + "/enhance", files={"image": ("p.jpg", data, "image/jpeg")}, timeout=60
        )
        assert r.status_code == 200, r.text
        fid = r.headers["x-factor-id"]
        npy = httpx.get(f"{maker.url}/factor/{fid}", params={"format": "npy"}).content
        png = httpx.get(f"{maker.url}/factor/{fid}").content
        made.append((maker, fid, npy, png))
    for maker, fid, npy, png in made:
        other = replicas[1 - replicas.index(maker)]
        assert httpx.get(f"{other.url}/factor/{fid}", params={"format": "npy"}).content == npy
        for _ in range(3):  # through the load balancer: whichever replica answers
            r = httpx.get(f"{front.url}/factor/{fid}", params={"format": "npy"})
            assert r.status_code == 200 and r.content == npy, r.text[:200]
        assert httpx.get(f"{front.url}/factor/{fid}").content == png
        assert np.load(io.BytesIO(npy)).shape == (43, 43, 3)  # EFE's size: 512 / 12
    unknown = httpx.get(f"{front.url}/factor/{'x' * 32}")
    assert_error(unknown, 404, "unknown_factor_id")


@needs_binaries
def test_redis_down_keeps_enhancing_and_says_so_then_recovers(fleet):
    redis, replicas, front = fleet
    data = jpegs(1)[0]
    fid = httpx.post(
        front.url + "/enhance", files={"image": ("p.jpg", data, "image/jpeg")}, timeout=60
    ).headers["x-factor-id"]
    redis.stop()
    try:
        r = httpx.post(
            front.url + "/enhance", files={"image": ("p.jpg", data, "image/jpeg")}, timeout=60
        )
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
        assert "x-factor-id" not in r.headers  # not stored, so no id to hand out
        t0 = time.monotonic()
        gone = httpx.get(f"{front.url}/factor/{fid}")
        assert time.monotonic() - t0 < 2  # a dead Redis fails fast
        assert_error(gone, 503, "factor_store_unavailable")
        for replica in replicas:
            ready = httpx.get(replica.url + "/readyz")
            assert ready.status_code == 200, ready.text  # still enhances: stays in rotation
            assert ready.json()["factor_store"] == {"backend": "redis", "available": False}
        failed = [
            metric(
                httpx.get(r.url + "/metrics").text,
                "sgz_factor_store_errors_total",
                operation="save",
            )
            for r in replicas
        ]
        assert sum(failed) >= 1  # the replica that enhanced counted its failed save
    finally:
        redis.start()
    deadline = time.monotonic() + 10
    while not all(
        httpx.get(r.url + "/readyz").json()["factor_store"]["available"] for r in replicas
    ):
        assert time.monotonic() < deadline, "replicas never saw Redis back"
        time.sleep(0.2)
    r = httpx.post(
        front.url + "/enhance", files={"image": ("p.jpg", data, "image/jpeg")}, timeout=60
    )
    fid = r.headers["x-factor-id"]
    for replica in replicas:
        assert httpx.get(f"{replica.url}/factor/{fid}").status_code == 200


@needs_binaries
def test_video_jobs_through_nginx_pinned_to_one_replica(fleet, tmp_path):
    """The pinning option (render_nginx sends /jobs to the first replica only)."""
    from video_files import make_video

    _, replicas, front = fleet
    video = tmp_path / "clip.mp4"
    make_video(video, frames=10)
    r = httpx.post(
        front.url + "/jobs",
        content=video.read_bytes(),
        headers={"content-type": "video/mp4"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert httpx.get(f"{replicas[0].url}/jobs/{job_id}").status_code == 200  # the jobs replica
    deadline = time.monotonic() + 60
    while (job := httpx.get(f"{front.url}/jobs/{job_id}").json())["state"] != "done":
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.2)
    result = httpx.get(front.url + job["result"], timeout=30)
    assert result.status_code == 200 and len(result.content) == job["output_bytes"]


@needs_binaries
def test_redis_store_bounds_by_count_bytes_and_age(fleet):
    from service.redis_store import PREFIX, RedisFactorStore

    redis_url = fleet[0].url[:-1] + "1"  # a database of its own
    lowres = torch.rand(3, 9, 16)
    one = lowres.numel() * 4

    async def go():
        store = RedisFactorStore(
            redis_url, max_items=3, max_bytes=2 * one, max_map_bytes=one, ttl_s=0.5, timeout_s=0.25
        )
        try:
            await store._redis.flushdb()
            a, b, c = [await store.save(lowres, (108, 192)) for _ in range(3)]
            assert await store.load(a) is None  # over the byte budget: the oldest went
            assert await store.load(b) is not None  # also when all three came in one millisecond
            got = await store.load(c)
            assert got.size == (108, 192) and torch.equal(got.lowres, lowres)
            assert int(await store._redis.get(PREFIX + "bytes")) == 2 * one
            assert await store.save(torch.rand(3, 10, 16), (1, 1)) is None  # over the map cap
            await asyncio.sleep(0.6)  # past the TTL: gone, and forgotten by the index
            assert await store.load(b) is None and await store.load(c) is None
            d = await store.save(lowres, (1, 1))
            assert await store._redis.zrange(PREFIX + "index", 0, -1) == [d.encode()]
            assert int(await store._redis.get(PREFIX + "bytes")) == one
        finally:
            await store._redis.flushdb()
            await store.close()

    asyncio.run(go())


def test_memory_store_has_the_same_interface_and_bounds_by_age_and_map_size():
    from service.factor_store import FactorStore
    from service.redis_store import RedisFactorStore

    interface = {"save", "load", "status", "close", "backend"}
    assert interface <= set(dir(FactorStore)) and interface <= set(dir(RedisFactorStore))
    lowres = torch.rand(3, 9, 16)
    store = FactorStore(10, 1 << 20, ttl_s=0.3, max_map_bytes=lowres.numel() * 4)

    async def go():
        a = await store.save(lowres, (108, 192))
        assert torch.equal((await store.load(a)).lowres, lowres)
        assert await store.save(torch.rand(3, 10, 16), (1, 1)) is None  # over the map cap
        await asyncio.sleep(0.35)
        assert await store.load(a) is None and len(store) == 0 and store.nbytes == 0
        assert await store.status() == {"backend": "memory", "available": True}

    asyncio.run(go())


def post_video(server: Server, video: Path, **params) -> str:
    r = httpx.post(
        f"{server.url}/jobs",
        content=video.read_bytes(),
        params=params,
        headers={"content-type": "video/mp4"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def poll(server: Server, job_id: str, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.url}/jobs/{job_id}")
        assert r.status_code == 200, r.text
        if until(job := r.json()):
            return job
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)


@needs_binaries
def test_a_video_job_is_answered_served_and_deleted_by_any_replica(fleet, jobs_dir, tmp_path):
    """Made on A; polled, downloaded (whole and by range) and deleted through B."""
    from video_files import make_video

    _, (a, b), _ = fleet
    make_video(tmp_path / "clip.mp4", frames=10)
    job_id = post_video(a, tmp_path / "clip.mp4")
    done = poll(b, job_id, lambda job: job["state"] == "done")
    assert done == httpx.get(f"{a.url}/jobs/{job_id}").json()  # the record is A's own view
    assert done["frames_done"] == 10 and done["result"] == f"/jobs/{job_id}/result"
    whole = httpx.get(a.url + done["result"], timeout=30)
    from_b = httpx.get(b.url + done["result"], timeout=30)
    assert from_b.status_code == 200 and from_b.headers["content-type"] == "video/mp4"
    assert from_b.content == whole.content and len(whole.content) == done["output_bytes"]
    part = httpx.get(b.url + done["result"], headers={"range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == whole.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(whole.content)}"
    assert_error(
        httpx.get(b.url + done["result"], headers={"range": f"bytes={len(whole.content)}-"}),
        416,
        "range_not_satisfiable",
    )

    # a replica that cannot see the file (a jobs folder not shared) says so, naming the owner
    (output,) = jobs_dir.glob(f"*/{job_id}/output.mp4")
    output.rename(output.with_suffix(".hidden"))
    unseen = httpx.get(b.url + done["result"])
    assert_error(unseen, 503, "job_result_unavailable")
    assert "SGZ_JOBS_DIR" in unseen.json()["detail"]
    output.with_suffix(".hidden").rename(output)

    r = httpx.delete(f"{b.url}/jobs/{job_id}")  # finished: B deletes files and record
    assert r.status_code == 200 and r.json()["state"] == "done"
    assert not list(jobs_dir.glob(f"*/{job_id}"))
    for replica in (a, b):
        for method, path in (
            ("GET", f"/jobs/{job_id}"),
            ("GET", f"/jobs/{job_id}/result"),
            ("DELETE", f"/jobs/{job_id}"),
            ("GET", "/jobs/" + "0" * 32),
        ):
            assert_error(httpx.request(method, replica.url + path), 404, "unknown_job")


@needs_binaries
def test_a_job_running_on_one_replica_is_cancelled_through_another(fleet, jobs_dir, tmp_path):
    from video_files import make_video

    _, (a, b), _ = fleet
    frames = 600  # 320x240 with x265's slower preset: still running when B cancels it
    make_video(tmp_path / "long.mp4", width=320, height=240, frames=frames)
    job_id = post_video(a, tmp_path / "long.mp4", codec="hevc", preset="slower")
    poll(b, job_id, lambda job: job["state"] == "running" and job["frames_done"] > 0)
    start = time.monotonic()
    r = httpx.delete(f"{b.url}/jobs/{job_id}", timeout=40)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert time.monotonic() - start < 10  # A saw the flag and stopped, not ran to the end
    for replica in (a, b):
        job = httpx.get(f"{replica.url}/jobs/{job_id}").json()
        assert job["state"] == "cancelled" and job["frames_done"] < frames, job
        assert_error(httpx.get(f"{replica.url}/jobs/{job_id}/result"), 409, "job_cancelled")
    assert f"job {job_id} cancelled through another replica" in a.log()
    deadline = time.monotonic() + 5
    while list(jobs_dir.glob(f"*/{job_id}")):  # A removes its files, as for its own DELETE
        assert time.monotonic() < deadline
        time.sleep(0.1)


@needs_binaries
def test_jobs_with_redis_down_stay_local_then_are_shared_again(fleet, tmp_path):
    from video_files import make_video

    redis, (a, b), _ = fleet
    make_video(tmp_path / "clip.mp4", frames=6)
    redis.stop()
    try:
        job_id = post_video(a, tmp_path / "clip.mp4")  # made and run locally
        done = poll(a, job_id, lambda job: job["state"] == "done")
        assert httpx.get(a.url + done["result"]).status_code == 200
        start = time.monotonic()
        assert_error(httpx.get(f"{b.url}/jobs/{job_id}"), 503, "job_store_unavailable")
        assert_error(httpx.get(f"{a.url}/jobs/{'0' * 32}"), 503, "job_store_unavailable")
        assert time.monotonic() - start < 2  # a dead Redis fails fast
        failed = metric(
            httpx.get(a.url + "/metrics").text, "sgz_job_store_errors_total", operation="put"
        )
        assert failed >= 1
    finally:
        redis.start()
    # A writes the record of the job it finished meanwhile: B finds it, result and all
    deadline = time.monotonic() + 10
    while (r := httpx.get(f"{b.url}/jobs/{job_id}")).status_code != 200:
        assert r.status_code in (503, 404) and time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.json() == httpx.get(f"{a.url}/jobs/{job_id}").json()
    assert httpx.get(b.url + done["result"]).content == httpx.get(a.url + done["result"]).content


@needs_binaries
def test_a_replica_stopping_under_load_costs_no_request(fleet):
    """SIGTERM to replica B while requests flow through nginx (a rolling restart): during its
    grace it answers 503 shutting_down, then it stops listening; nginx retries both on A.
    Runs last: the fleet is down to one replica after it."""
    _, replicas, front = fleet
    images, statuses = jpegs(32), []
    stop_at, seen = len(images) // 4, len(front.log())

    async def go():
        async with httpx.AsyncClient(base_url=front.url, timeout=120) as client:
            gate = asyncio.Semaphore(4)

            async def one(i: int, data: bytes):
                async with gate:
                    if i == stop_at:
                        replicas[1].proc.terminate()
                    r = await client.post(
                        "/enhance", files={"image": ("p.jpg", data, "image/jpeg")}
                    )
                    statuses.append(r.status_code if r.status_code == 200 else r.text[:200])
                    await asyncio.sleep(0.05)  # keep requests flowing through B's grace

            await asyncio.gather(*(one(i, d) for i, d in enumerate(images)))

    asyncio.run(go())
    assert replicas[1].proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert statuses == [200] * len(images), statuses
    retried = re.findall(r"ust=(\S+, \S+)", front.log()[seen:])  # a second replica answered
    assert retried and all(s.endswith("200") for s in retried), retried


@needs_binaries
def test_nginx_own_errors_are_json_like_the_service():
    from bench.servers import free_port

    front = Nginx([f"127.0.0.1:{free_port()}"])  # nobody listens there
    try:
        r = httpx.post(front.url + "/enhance", content=b"x", headers={"X-Request-ID": "nr-1"})
        assert_error(r, 503, "no_replica")
        assert r.headers["retry-after"] == "1" and r.headers["x-request-id"] == "nr-1"
        limit = Settings.model_construct().max_upload_bytes
        big = httpx.post(front.url + "/enhance", content=b"\0" * (limit + 1))
        assert_error(big, 413, "payload_too_large")
    finally:
        front.close()
