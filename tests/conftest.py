import os
from pathlib import Path

import pytest

SHARED = Path(
    os.environ.get("SGZ_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")
).resolve()
DATA = SHARED / "data"
SICE = DATA / "sice-real"
LOL = DATA / "lol-pairs"
TRAIN = DATA / "train"
SGZ_PUBLISHED = SHARED / "peers" / "sgz-published.pth"
ZERO_DCE_PP_PUBLISHED = SHARED / "peers" / "zero-dce-pp-published.pth"


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"shared data not found at {SHARED}; set SGZ_SHARED"
    return SHARED


@pytest.fixture(scope="session")
def published_enhancer():
    from model import load_model

    return load_model(SGZ_PUBLISHED, device="cpu")


# End-to-end modules (real servers, browsers, Ray, nginx, Prometheus, training runs): marked slow
# as a whole, so `make test-fast` (-m "not slow") leaves them to `make test`.
SLOW_MODULES = {
    "test_page",
    "test_scaleout",
    "test_prometheus",
    "test_ray_enhance",
    "test_jobs",
    "test_service_hardening",
    "test_service_lifecycle",
    "test_service_memory",
    "test_observability",
    "test_bench",
    "test_training",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
