"""A real Prometheus (Debian's `prometheus`) scraping real `sgz serve` processes with the repo's
scrape config (docker/prometheus.yml, its target and interval swapped for the test's), checked
through Prometheus's own HTTP API: the series arrive with their labels, with and without
SGZ_API_KEY, and a scrape without the key is refused."""

import copy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sgz_server import Server, photo

from bench.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docker" / "prometheus.yml"
REPLICAS_CONFIG = ROOT / "docker" / "prometheus.replicas.yml"
KEY = "prometheus-test-key-0123456789"
pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus (scripts/setup.sh installs the Debian package as root)",
)


def scrape_job(config_file: Path) -> dict:
    (job,) = yaml.safe_load(config_file.read_text())["scrape_configs"]
    return job


def render(targets: dict[str, str], key_file: Path) -> dict:
    """docker/prometheus.yml with one copy of its job per target, scraping every second:
    `plain` as is, `keyed` with the Bearer key file, `nokey` a keyed server without it."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    base = scrape_job(CONFIG)
    jobs = []
    for name, target in targets.items():
        job = copy.deepcopy(base)
        job["job_name"] = f"{base['job_name']}-{name}"
        job["static_configs"] = [{"targets": [target]}]
        if name == "keyed":
            job["authorization"] = {"type": "Bearer", "credentials_file": str(key_file)}
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@pytest.fixture(scope="module")
def servers():
    fast_stop = {"SGZ_SHUTDOWN_GRACE_S": "0"}  # nothing to drain: teardown in 1 s, not 4
    plain, keyed = Server(fast_stop), Server({**fast_stop, "SGZ_API_KEY": KEY})
    try:
        plain.wait_ready(180)
        keyed.wait_ready(180)
        yield plain, keyed
    finally:
        plain.close()
        keyed.close()


@pytest.fixture(scope="module")
def prometheus(servers):
    plain, keyed = servers
    with tempfile.TemporaryDirectory(prefix="sgz-prometheus-") as tmp:
        tmp = Path(tmp)
        (tmp / "key").write_text(KEY)
        targets = {
            "plain": f"127.0.0.1:{plain.port}",
            "keyed": f"127.0.0.1:{keyed.port}",
            "nokey": f"127.0.0.1:{keyed.port}",
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(render(targets, tmp / "key")))
        port = free_port()
        log = open(tmp / "prometheus.log", "w")
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
                try:
                    if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "prometheus not ready after 30 s"
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


def query(url: str, promql: str) -> list[dict]:
    body = httpx.get(url + "/api/v1/query", params={"query": promql}).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def eventually(fn, timeout: float = 20):
    """fn()'s first truthy value, polling: Prometheus scrapes every second."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, "not seen by Prometheus in time"
        time.sleep(0.25)
    return value


def test_both_scrape_configs_are_valid_and_differ_only_in_discovery():
    for config in (CONFIG, REPLICAS_CONFIG):
        check = subprocess.run(
            ["promtool", "check", "config", str(config)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    single, replicas = scrape_job(CONFIG), scrape_job(REPLICAS_CONFIG)
    assert single.pop("static_configs") == [{"targets": ["sgz:8000"]}]
    assert replicas.pop("dns_sd_configs")[0] == {
        "names": ["sgz", "sgz-jobs"],
        "type": "A",
        "port": 8000,
        "refresh_interval": "10s",
    }
    assert single == replicas


def test_targets_up_and_a_scrape_without_the_key_is_refused(prometheus, servers):
    def targets():
        active = httpx.get(prometheus + "/api/v1/targets").json()["data"]["activeTargets"]
        by_job = {t["labels"]["job"]: t for t in active}
        return (
            by_job if all(t["health"] != "unknown" for t in active) and len(active) == 3 else None
        )

    by_job = eventually(targets)
    plain, keyed = servers
    assert by_job["sgz-serve-plain"]["health"] == "up"
    assert by_job["sgz-serve-plain"]["labels"]["instance"] == f"127.0.0.1:{plain.port}"
    assert by_job["sgz-serve-keyed"]["health"] == "up"
    refused = by_job["sgz-serve-nokey"]
    assert refused["health"] == "down" and "401" in refused["lastError"], refused
    assert query(prometheus, 'up{job="sgz-serve-nokey"}')[0]["value"][1] == "0"


@pytest.mark.parametrize("job, index", [("sgz-serve-plain", 0), ("sgz-serve-keyed", 1)])
def test_sgz_series_arrive_with_their_labels(prometheus, servers, job, index):
    server = servers[index]
    auth = {"Authorization": f"Bearer {KEY}"} if index else {}
    data = photo((512, 512)).read_bytes()
    for _ in range(2):
        r = httpx.post(
            server.url + "/enhance",
            content=data,
            headers={**auth, "Content-Type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/factor/unknown0id", headers=auth).status_code == 404
    instance = f"127.0.0.1:{server.port}"

    def count(endpoint: str, status: str, sent: int):
        found = query(
            prometheus, f'sgz_requests_total{{job="{job}",endpoint="{endpoint}",status="{status}"}}'
        )
        return found if found and float(found[0]["value"][1]) >= sent else None

    (ok,) = eventually(lambda: count("/enhance", "200", 2))
    assert ok["metric"]["instance"] == instance and ok["metric"]["job"] == job
    assert float(ok["value"][1]) == 2  # what this test sent; nothing else enhances here
    (missing,) = eventually(lambda: count("/factor/{factor_id}", "404", 1))
    assert missing["metric"]["instance"] == instance
    (model,) = query(prometheus, f'sgz_model_info{{job="{job}"}}')
    assert model["metric"]["device"] and len(model["metric"]["checkpoint_sha256"]) == 64
    buckets = query(
        prometheus,
        f'sgz_request_duration_seconds_bucket{{job="{job}",endpoint="/enhance",le="+Inf"}}',
    )
    assert buckets and float(buckets[0]["value"][1]) == 2
