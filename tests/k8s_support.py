"""Helpers of tests/test_k8s.py: schemas for the custom resources, Kubernetes quantities, and
real Redis and Prometheus processes on loopback."""

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|)$")
UNITS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(q) -> float:
    m = QUANTITY.match(str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m[1]) * UNITS[m[2]]


# Written from the CRDs' schemas (KEDA config/crd/bases/keda.sh_scaledobjects.yaml, Prometheus
# Operator monitoring.coreos.com_servicemonitors.yaml): their required fields and types, closed
# (additionalProperties: false) where these manifests use them, so a misspelt field fails.
def _closed(properties: dict, required=()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


INT, STR = {"type": "integer"}, {"type": "string"}
META = {"type": "object", "required": ["name"], "properties": {"name": STR}}
DURATION = {"type": "string", "pattern": r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"}
SECRET_KEY = _closed({"name": STR, "key": STR, "optional": {"type": "boolean"}}, ["key"])
CRD_SCHEMAS = {
    "ScaledObject": _closed(
        {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": META,
            "spec": _closed(
                {
                    "scaleTargetRef": _closed(
                        {
                            "apiVersion": STR,
                            "kind": STR,
                            "name": STR,
                            "envSourceContainerName": STR,
                        },
                        ["name"],
                    ),
                    "pollingInterval": INT,
                    "cooldownPeriod": INT,
                    "minReplicaCount": INT,
                    "maxReplicaCount": INT,
                    "idleReplicaCount": INT,
                    "fallback": _closed(
                        {"failureThreshold": INT, "replicas": INT}, ["failureThreshold", "replicas"]
                    ),
                    "advanced": _closed(
                        {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": _closed(
                                {"name": STR, "behavior": {"type": "object"}}
                            ),
                        }
                    ),
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": _closed(
                            {
                                "type": STR,
                                "name": STR,
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": {"type": "object", "additionalProperties": STR},
                                "authenticationRef": _closed({"name": STR, "kind": STR}, ["name"]),
                            },
                            ["type", "metadata"],
                        ),
                    },
                },
                ["scaleTargetRef", "triggers"],
            ),
        },
        ["apiVersion", "kind", "metadata", "spec"],
    ),
    "ServiceMonitor": _closed(
        {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": META,
            "spec": _closed(
                {
                    "selector": {"type": "object"},
                    "jobLabel": STR,
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "items": _closed(
                            {
                                "port": STR,
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": DURATION,
                                "scrapeTimeout": DURATION,
                                "authorization": _closed({"type": STR, "credentials": SECRET_KEY}),
                            }
                        ),
                    },
                },
                ["selector"],
            ),
        },
        ["apiVersion", "kind", "metadata", "spec"],
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port: int, *words: str):
    """One command in RESP; its reply (bulk strings as str, arrays as lists)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(
            f"*{len(words)}\r\n".encode()
            + b"".join(f"${len(w)}\r\n{w}\r\n".encode() for w in words)
        )
        return read_reply(f)


def read_reply(f):
    line = f.readline().decode().rstrip("\r\n")
    kind, rest = line[0], line[1:]
    if kind == "*":
        return [read_reply(f) for _ in range(int(rest))]
    if kind == "$":
        return f.read(int(rest) + 2)[:-2].decode()
    assert kind in "+:", line  # "-": an error
    return rest


class Redis:
    """redis-server with the manifest's arguments, on loopback and a free port."""

    def __init__(self, args: list[str], folder: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no redis-server (Debian package redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, *args, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for _ in range(100):
            try:
                redis_command(self.port, "PING")
                return
            except OSError:
                assert self.proc.poll() is None, "redis-server refused the manifest's arguments"
                time.sleep(0.05)
        raise TimeoutError("redis-server did not answer")

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def hold_requests(port: int, n: int) -> list[socket.socket]:
    """n uploads whose body never finishes: each is a request in flight until closed."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(
            b"POST /enhance HTTP/1.1\r\nHost: sgz\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n\x89PNG"
        )
        held.append(s)
    return held


def release(held: list[socket.socket]) -> None:
    while held:
        held.pop().close()


def prometheus_value(url: str, query: str) -> float | None:
    result = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5).json()
    assert result["status"] == "success", result
    samples = result["data"]["result"]
    return float(samples[0]["value"][1]) if samples else None


def wait_for(what, predicate, timeout: float = 30):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = what()
        if predicate(value):
            return value
        time.sleep(0.25)
    raise AssertionError(f"still {value} after {timeout} s")


def start_prometheus(folder: Path, job: str, namespace: str, path: str, target: str):
    """Prometheus scraping `target` under the labels the Prometheus Operator gives a
    ServiceMonitor's targets (job = the Service, namespace)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus (Debian package prometheus)")
    (folder / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": job,
                        "metrics_path": path,
                        "static_configs": [
                            {"targets": [target], "labels": {"namespace": namespace}}
                        ],
                    }
                ],
            }
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, "prometheus exited"
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, bool)
    except BaseException:
        proc.kill()
        raise
    return proc, url
