import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("SGZ_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
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
