"""Start the real `sgz serve` as a subprocess on a free port, for end-to-end tests: the
benchmark's ServerProcess, with the published checkpoint and info logging by default."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from conftest import SGZ_PUBLISHED, SICE
from PIL import Image

from bench.servers import ServerProcess

SGZ = Path(sys.executable).with_name("sgz")
# The device the served model runs on: cpu in CI; SGZ_TEST_DEVICE=cuda on a GPU machine runs
# the same end-to-end tests against the CUDA path (scripts/gpu-check.sh).
DEVICE = os.environ.get("SGZ_TEST_DEVICE", "cpu")
# How far a served factor map may be from the CPU reference's: cuDNN sums in another order
FACTOR_ATOL = 1e-5 if DEVICE == "cpu" else 2e-3


class Server(ServerProcess):
    def __init__(self, env: dict[str, str] | None = None, checkpoint: Path = SGZ_PUBLISHED):
        self._dir = tempfile.TemporaryDirectory(prefix="sgz-serve-")
        super().__init__(
            "sgz",
            str(checkpoint),
            Path(self._dir.name),
            env={"SGZ_LOG_LEVEL": "info", **(env or {})},
            device=DEVICE,
        )

    def wait_ready(self, timeout: float = 90) -> "Server":
        super().wait_ready(timeout)
        return self

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> "Server":  # `with Server(env) as s:` waits for ready, then closes
        try:
            return self.wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


# Debian's chromium for the browser tests (never `playwright install`: scripts/setup.sh)
BROWSER = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
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
