"""Start the real `sgz serve` as a subprocess on a free port, for end-to-end tests."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from bench.http_bench import free_port
from conftest import SGZ_PUBLISHED, SICE

SGZ = Path(sys.executable).with_name("sgz")


class Server:
    def __init__(self, env: dict[str, str] | None = None, checkpoint: Path = SGZ_PUBLISHED):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="sgz-serve-", suffix=".log")
        env = {**os.environ, "SGZ_LOG_LEVEL": "info", **(env or {})}
        self.proc = subprocess.Popen(
            [str(SGZ), "serve", "--port", str(self.port), "--checkpoint", str(checkpoint)],
            env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90) -> "Server":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sgz serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sgz serve not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.terminate()
        self.log_file.close()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return 0.0


def photo(size: tuple[int, int]):
    """The first shared photo of that (width, height)."""
    for f in sorted(SICE.glob("*.png")):
        with Image.open(f) as im:
            if im.size == size:
                return f
    raise FileNotFoundError(f"no {size} photo in {SICE}")


def assert_error(response: httpx.Response, status: int, error: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == error and body["detail"], body
