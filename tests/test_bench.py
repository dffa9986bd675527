"""`sgz bench` on tiny settings: the real command, real servers over real sockets, real JPEGs.
These check that the harness measures what it says; they assert no speed."""

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SGZ_PUBLISHED, SHARED

from bench.http_cases import enhance_kwargs, parse_cases
from bench.load_client import percentile, run
from bench.model_bench import PublishedSGZ, photos, published_step, work
from model import load_model

ROOT = Path(__file__).resolve().parents[1]


def sgz_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "model.cli",
            "bench",
            "--shared",
            str(SHARED),
            "--checkpoint",
            str(SGZ_PUBLISHED),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_published_formulation_computes_our_model():
    """The baseline is the same model: on a multiple of 12 (the published script crops to one)
    it agrees with our eager reference, so the speed ratios compare like with like."""
    hwc = photos(SHARED, (120, 96), 2)
    eager = load_model(SGZ_PUBLISHED, device="cpu", backend="eager")
    net = PublishedSGZ(eager.efe.state_dict()).eval()
    got = published_step(net, hwc)
    want = eager.enhance(
        torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(), denoise=0, exposure=None
    )
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


def test_load_client_reads_every_framing_and_counts_failures():
    """The load client's own HTTP/1.1 against a real socket: answers framed by Content-Length,
    chunked or the connection's close all count; a wrong status or format and a reset fail."""
    png = b"\x89PNG" + bytes(range(256)) * 40
    seen = []

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            seen.append(body)
            kind = len(seen) % 5
            if kind == 0:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(png) + png)
            elif kind == 1:
                half = len(png) // 2
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n" % half
                    + png[:half]
                    + b"\r\n"
                    + b"%x;ext=1\r\n" % (len(png) - half)
                    + png[half:]
                    + b"\r\n0\r\n\r\n"
                )
            elif kind == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + png)
                await writer.drain()
                writer.close()
                return
            elif kind == 3:
                writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\n{}")
            else:  # a reset mid-answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n\x89PNG")
                writer.close()
                return
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run(f"http://127.0.0.1:{port}/enhance?x=1", [(".png", png)], 2, 0.5, 0)

    result = asyncio.run(main())
    assert seen and all(b'name="image"' in body and png in body for body in seen)
    statuses = result["statuses"]
    assert statuses["503"] >= 1 and statuses["IncompleteReadError"] >= 1
    assert result["ok"] >= 3 * statuses["503"] - 3 and result["failed"] == sum(
        n for code, n in statuses.items() if code != "200"
    )


def test_model_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = sgz_bench(
        "--parts",
        "model",
        "--sizes",
        "96x72,120x90",
        "--batches",
        "1,2",
        "--repeats",
        "3",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "published/fast" in r.stdout and "denoise/fast" in r.stdout and "floor" in r.stdout
    res = json.loads(out.read_text())
    rows = res["model"]["rows"]
    assert {(x["path"], x["width"], x["batch"]) for x in rows} == {
        (p, w, b)
        for p in ("fast", "denoise", "eager", "published")
        for w in (96, 120)
        for b in (1, 2)
    }
    assert all(x["ms_per_image"] > 0 and x["repeats"] == 3 for x in rows)
    assert len(res["model"]["ratios"]) == 4
    assert all(f["floor_ms"] > 0 for f in res["model"]["floor"]["sizes"])


def test_http_bench_smoke(tmp_path):
    servers = ["naive", "litserve"]
    if importlib.util.find_spec("service") is not None:
        servers.insert(0, "sgz")
    out = tmp_path / "http.json"
    r = sgz_bench(
        "--parts",
        "http",
        "--servers",
        ",".join(servers),
        "--concurrency",
        "1,3",
        "--duration",
        "1",
        "--rounds",
        "2",
        "--cases",
        "jpeg:small,png:160x120",
        "--query",
        "denoise=0&exposure=model",
        "--out",
        str(out),
        timeout=480,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())["http"]
    assert [s["server"] for s in res["servers"]] == servers
    assert [c["case"] for c in res["cases"]] == ["jpeg:small", "png:160x120"]
    assert res["query"] == "denoise=0&exposure=model"
    for s in res["servers"]:
        assert "error" not in s, s.get("error")
        assert 50 < s["rss_idle_mb"] <= s["rss_peak_mb"]
    for case in res["cases"]:
        floor = case["floor"]
        assert floor["decode_ms"] > 0 and floor["encode_ms"] > 0 and floor["model_ms"] > 0
        assert [s["server"] for s in case["servers"]] == servers
        for s in case["servers"]:
            assert [lv["concurrency"] for lv in s["levels"]] == [1, 3]
            for lv in s["levels"]:  # the load client counts only answers in the format sent
                assert lv["ok"] > 0 and lv["failed"] == 0, (case["case"], s["server"], lv)
                assert lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
                assert len(lv["rounds"]) == 2 and lv["ok"] == sum(t["ok"] for t in lv["rounds"])
    assert "png:160x120 c=3: sgz/litserve throughput" in r.stdout or "sgz" not in servers


def test_http_bench_runs_replicas_and_splits_load_over_client_processes(tmp_path):
    out = tmp_path / "http.json"
    args = "--parts http --servers sgz-cpujpeg*2 --concurrency 3 --load-processes 2 --duration 1.5"
    args += " --rounds 1 --cases jpeg:160x120"
    r = sgz_bench(*args.split(), "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    (server,) = json.loads(out.read_text())["http"]["cases"][0]["servers"]
    assert server["server"] == "sgz-cpujpeg*2"  # two processes, one load client on each
    (level,) = server["levels"]
    (turn,) = level["rounds"]
    assert turn["processes"] == 2 and turn["concurrency"] == 3 and "latencies_s" not in turn
    assert turn["ok"] > 0 and turn["failed"] == 0
    assert turn["throughput_rps"] > 0 and turn["p50_ms"] <= turn["p95_ms"] <= turn["p99_ms"]


def test_http_cases_parse_and_refuse():
    assert [c.name for c in parse_cases("jpeg:1200x900, png")] == ["jpeg:1200x900", "png:mixed"]
    for bad in ("gif:1200x900", "jpeg:big", "png:10x10", ""):
        with pytest.raises(ValueError):
            parse_cases(bad)
    assert enhance_kwargs("denoise=0&exposure=model") == {"denoise": 0.0, "exposure": None}
    assert enhance_kwargs("") == {}
    for bad in ("denoise=0&colour=red", "exposure=bright", "denoise"):
        with pytest.raises(ValueError):
            enhance_kwargs(bad)


def test_bad_arguments_exit_with_a_message():
    r = sgz_bench("--sizes", "big")
    assert r.returncode == 2 and "bad argument" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "model.cli", "bench", "--checkpoint", "/nonexistent.pth"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not found" in r.stderr
    if not torch.cuda.is_available():
        r = sgz_bench("--device", "cuda", "--parts", "model")
        assert r.returncode == 2 and "sees no CUDA GPU" in r.stderr


def _decode(path) -> tuple[np.ndarray, float]:
    import av

    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]), rate


def test_video_clip_is_dark_sized_and_deterministic(tmp_path):
    from bench.video_clips import main, make_clip

    gt = tmp_path / "gt.npy"
    assert (
        main(
            [
                str(tmp_path / "a.mp4"),
                "--size",
                "64x48",
                "--frames",
                "7",
                "--fps",
                "25",
                "--gt",
                str(gt),
                "--shared",
                str(SHARED),
            ]
        )
        == 0
    )
    make_clip(tmp_path / "b.mp4", 64, 48, 7, 25, shared=SHARED)
    make_clip(tmp_path / "c.mp4", 64, 48, 7, 25, seed=1, shared=SHARED)
    make_clip(tmp_path / "clean.mp4", 64, 48, 7, 25, dark=False, shared=SHARED)
    a, rate = _decode(tmp_path / "a.mp4")
    truth = np.load(gt)
    assert a.shape == truth.shape == (7, 48, 64, 3) and rate == 25
    assert a.mean() < 0.6 * truth.mean()  # dark: the recipe's exposure is 0.08 in linear light
    assert np.array_equal(a, _decode(tmp_path / "b.mp4")[0])  # same seed, same clip
    assert not np.array_equal(a, _decode(tmp_path / "c.mp4")[0])
    clean = _decode(tmp_path / "clean.mp4")[0]
    mse = ((clean.astype(float) - truth) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 27  # the encoder's and 4:2:0's loss only (~30 dB)
    assert np.abs(truth[1:].astype(int) - truth[:-1]).mean() > 0.5  # the camera moves
    with pytest.raises(ValueError, match="even"):
        make_clip(tmp_path / "odd.mp4", 63, 48, 2, shared=SHARED)


def test_video_bench_smoke(tmp_path):
    out = tmp_path / "video.json"
    r = sgz_bench(
        "--parts",
        "video",
        "--video-sizes",
        "160x96",
        "--video-frames",
        "12",
        "--video-rounds",
        "1",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "x transcode" in r.stdout and "vs loop" in r.stdout
    res = json.loads(out.read_text())["video"]
    rows = {x["path"]: x for x in res["rows"]}
    assert list(rows) == ["transcode", "transcode-out", "temporal", "frames", "loop"]
    for name, x in rows.items():
        assert (x["width"], x["height"], x["frames"]) == (160, 96, 12), name
        assert len(x["rounds"]) == 1 and all(c["frames"] == 12 for c in x["rounds"]), name
        assert x["seconds"] > 0 and x["fps"] > 0 and x["encode_s"] > 0, name
        assert x["out_bytes"] > 0 and x["x_transcode"] > 0 and x["speedup_vs_loop"] > 0, name
        assert (x["model_s"] > 0) == ("transcode" not in name), name
    assert rows["transcode"]["x_transcode"] == 1 and rows["loop"]["speedup_vs_loop"] == 1
    assert rows["transcode-out"]["x_transcode_out"] == 1


def test_video_bench_refuses_odd_sizes():
    r = sgz_bench("--parts", "video", "--video-sizes", "161x96")
    assert r.returncode == 2 and "even" in r.stderr


def test_unknown_server_or_revision_is_refused(tmp_path):
    r = sgz_bench("--parts", "http", "--servers", "sgz,tgi")
    assert r.returncode == 2 and "tgi" in r.stderr
    r = sgz_bench(
        "--parts",
        "http",
        "--servers",
        "sgz@no-such-revision",
        "--concurrency",
        "1",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--cases",
        "jpeg:small",
    )
    assert "cannot check out 'no-such-revision'" in r.stdout, r.stdout + r.stderr
