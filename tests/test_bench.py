"""`sgz bench` on tiny settings: the real command, real servers over real sockets, real JPEGs.
These check that the harness measures what it says; they assert no speed."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import SGZ_PUBLISHED, SHARED
from bench.load_client import percentile
from bench.model_bench import PublishedSGZ, photos, published_step, work
from model import load_model

ROOT = Path(__file__).resolve().parents[1]


def sgz_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.cli", "bench", "--shared", str(SHARED),
                           "--checkpoint", str(SGZ_PUBLISHED), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_published_formulation_computes_our_model():
    """The baseline is the same model: on a multiple of 12 (the published script crops to one)
    it agrees with our eager reference, so the speed ratios compare like with like."""
    hwc = photos(SHARED, (120, 96), 2)
    eager = load_model(SGZ_PUBLISHED, "cpu", fast=False)
    net = PublishedSGZ(eager.efe.state_dict()).eval()
    got = published_step(net, hwc)
    want = eager.enhance(torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(), denoise=0,
                         exposure=None)
    assert got.shape == want.shape == (2, 3, 96, 120)
    assert (got.int() - want.int()).abs().max().item() <= 1


def test_floor_counts():
    w = work(1200, 900)
    assert w["bytes"] == 2 * 1200 * 900 * 3
    assert 250e6 < w["flops"] < 350e6  # EFE at 75x100 ~151 MFLOP + RIE ~143 MFLOP


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0 and np.isnan(percentile([], 50))


def test_model_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = sgz_bench("--parts", "model", "--sizes", "96x72,120x90", "--batches", "1,2",
                  "--repeats", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "published/fast" in r.stdout and "denoise/fast" in r.stdout and "floor" in r.stdout
    res = json.loads(out.read_text())
    rows = res["model"]["rows"]
    assert {(x["path"], x["width"], x["batch"]) for x in rows} == {
        (p, w, b) for p in ("fast", "denoise", "eager", "published") for w in (96, 120)
        for b in (1, 2)}
    assert all(x["ms_per_image"] > 0 and x["repeats"] == 3 for x in rows)
    assert len(res["model"]["ratios"]) == 4
    assert all(f["floor_ms"] > 0 for f in res["model"]["floor"]["sizes"])


def test_http_bench_smoke(tmp_path):
    servers = ["naive", "litserve"]
    if importlib.util.find_spec("service") is not None:
        servers.insert(0, "sgz")
    out = tmp_path / "http.json"
    r = sgz_bench("--parts", "http", "--servers", ",".join(servers), "--concurrency", "1,3",
                  "--duration", "1", "--rounds", "2", "--images", "small", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["http"]
    assert [s["server"] for s in res["servers"]] == servers
    for s in res["servers"]:
        assert "error" not in s, s.get("error")
        assert [lv["concurrency"] for lv in s["levels"]] == [1, 3]
        for lv in s["levels"]:
            assert lv["ok"] > 0 and lv["failed"] == 0, (s["server"], lv)
            assert lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
            assert len(lv["rounds"]) == 2 and lv["ok"] == sum(t["ok"] for t in lv["rounds"])
        assert 50 < s["rss_idle_mb"] <= s["rss_peak_mb"]


def test_bad_arguments_exit_with_a_message():
    r = sgz_bench("--sizes", "big")
    assert r.returncode == 2 and "bad list" in r.stderr
    r = subprocess.run([sys.executable, "-m", "model.cli", "bench", "--checkpoint",
                        "/nonexistent.pth"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr
    if not torch.cuda.is_available():
        r = sgz_bench("--device", "cuda", "--parts", "model")
        assert r.returncode == 2 and "sees no CUDA GPU" in r.stderr
