"""End to end: video jobs over a real socket with the real model. Submit, poll, download (whole
and by range), bad and oversized uploads, a full queue, cancelling, /enhance while a job runs,
metrics, and a shutdown that cancels and cleans up.

One server holds at most one queued job; a 1500-frame 320x240 video written with a slow
encoder keeps a job running long enough to act on it, on a CPU or a GPU.
"""

import io
import signal
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image
from sgz_server import Server, assert_error, metric, photo

MAX_UPLOAD = 1024 * 1024
MAX_DURATION_S = 30
LONG = 1500  # frames at 320x240, still running while the tests act on the job:
# ...with x265's slower preset (~40 frames/s on 2 cores, and few threads at this size), so
# that a machine with more cores or a GPU does not finish it first
SLOW = {"codec": "hevc", "preset": "slower"}


def make_video(
    path: Path,
    width: int = 96,
    height: int = 64,
    frames: int = 20,
    fps: int = 10,
    audio: bool = False,
    faststart: bool = False,
) -> Path:
    """A dark gradient with a moving grey square, libx264 (and a 440 Hz AAC tone);
    `faststart`: the index (with the frame count) before the frames."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 60 // width, y * 60 // height, np.full_like(x, 20)], -1)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast"}
        a = c.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            img = base.astype(np.uint8)
            left = (i * 3) % (width - 16)
            img[10:26, left : left + 16] = 90
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
        if a is not None:
            t = np.arange(16000 * frames // fps) / 16000
            tone = av.AudioFrame.from_ndarray(
                (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                format="fltp",
                layout="mono",
            )
            tone.sample_rate = 16000
            c.mux(a.encode(tone))
            c.mux(a.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "short": make_video(d / "short.mp4", audio=True),
        "small": make_video(d / "small.mp4", 64, 48, 12),
        "long": make_video(d / "long.mp4", 320, 240, LONG, fps=60),
        "too_long": make_video(d / "too_long.mp4", 64, 48, MAX_DURATION_S + 5, fps=1),
        "indexed": make_video(d / "indexed.mp4", 64, 48, 30, faststart=True),
    }


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(jobs_dir):
    s = Server(
        {
            "SGZ_JOBS_DIR": str(jobs_dir),
            "SGZ_MAX_QUEUED_JOBS": "1",
            "SGZ_MAX_VIDEO_UPLOAD_BYTES": str(MAX_UPLOAD),
            "SGZ_MAX_VIDEO_DURATION_S": str(MAX_DURATION_S),
            "SGZ_RETRY_AFTER_S": "7",
        }
    )
    try:
        yield s.wait_ready()
    finally:
        s.close()


def submit(server, video: Path, **params) -> httpx.Response:
    return httpx.post(
        f"{server.url}/jobs",
        content=video.read_bytes(),
        params=params,
        headers={"content-type": "video/mp4"},
        timeout=30,
    )


def wait_for(server, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{server.url}/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < end, f"job never reached {states}: {job}"
        time.sleep(0.1)


def job_folders(jobs_dir: Path) -> set[str]:
    return {p.name for p in jobs_dir.glob("*/*")}


def decode(data: bytes) -> tuple[list[np.ndarray], int]:
    """The frames (RGB) and the number of audio streams of an encoded video."""
    with av.open(io.BytesIO(data)) as c:
        audio = len(c.streams.audio)
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)], audio


def test_submit_poll_download(server, videos):
    r = submit(server, videos["short"], strength=0.8, crf=23, preset="veryfast")
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["created"]
    assert job["options"] == {
        "strength": 0.8,
        "denoise": 1.0,
        "exposure": "auto",
        "temporal": True,
        "codec": "h264",
        "crf": 23,
        "preset": "veryfast",
    }
    assert job["input"]["width"] == 96 and job["input"]["frames"] == 20
    done = wait_for(server, job["id"], ("done", "failed"))
    assert done["state"] == "done", done
    assert done["frames_done"] == done["frames_total"] == 20
    assert done["fps"] > 0 and done["eta_s"] == 0 and done["started"] and done["finished"]
    assert done["dropped_streams"] == []  # the AAC track is copied
    result = httpx.get(server.url + done["result"], timeout=30)
    assert result.status_code == 200
    assert result.headers["content-type"] == "video/mp4"
    assert result.headers["accept-ranges"] == "bytes"
    assert len(result.content) == done["output_bytes"]
    frames, audio = decode(result.content)
    assert len(frames) == 20 and frames[0].shape == (64, 96, 3) and audio == 1
    source, _ = decode(videos["short"].read_bytes())
    assert frames[0].mean() > source[0].mean() + 10  # brighter


def test_range_requests(server, videos):
    job = submit(server, videos["small"]).json()
    wait_for(server, job["id"], ("done",))
    url = f"{server.url}/jobs/{job['id']}/result"
    whole = httpx.get(url).content
    r = httpx.get(url, headers={"range": "bytes=10-99"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 10-99/{len(whole)}"
    assert r.content == whole[10:100]
    r = httpx.get(url, headers={"range": "bytes=-50"})
    assert r.status_code == 206 and r.content == whole[-50:]
    r = httpx.get(url, headers={"range": f"bytes={len(whole)}-"})
    assert_error(r, 416, "range_not_satisfiable")
    assert r.headers["content-range"] == f"bytes */{len(whole)}"


def test_multipart_upload_and_vp9_webm(server, videos):
    r = httpx.post(
        f"{server.url}/jobs",
        params={"codec": "vp9", "preset": "ultrafast"},
        files={"video": ("clip.mp4", videos["small"].read_bytes(), "video/mp4")},
    )
    assert r.status_code == 202, r.text
    done = wait_for(server, r.json()["id"], ("done", "failed"))
    assert done["state"] == "done", done
    result = httpx.get(server.url + done["result"])
    assert result.headers["content-type"] == "video/webm"
    frames, _ = decode(result.content)
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3)


def test_bad_uploads_are_refused_and_leave_nothing(server, jobs_dir):
    before = job_folders(jobs_dir)
    png = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 10, 10)).save(png, "PNG")
    for body in (np.random.default_rng(0).bytes(5000), png.getvalue()):
        r = httpx.post(
            f"{server.url}/jobs", content=body, headers={"content-type": "application/octet-stream"}
        )
        assert_error(r, 422, "invalid_video")
    assert_error(
        httpx.post(f"{server.url}/jobs", content=b"", headers={"content-type": "video/mp4"}),
        400,
        "empty_video",
    )
    assert_error(
        httpx.post(f"{server.url}/jobs", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    for params in (
        {"crf": 99},
        {"preset": "warp"},
        {"codec": "mjpeg"},
        {"strength": 2},
        {"exposure": "dim"},
    ):
        r = httpx.post(
            f"{server.url}/jobs",
            content=png.getvalue(),
            params=params,
            headers={"content-type": "video/mp4"},
        )
        assert_error(r, 422, "invalid_parameter")
    assert job_folders(jobs_dir) == before


def test_a_video_broken_past_its_header_fails_the_job(server, videos, jobs_dir):
    data = videos["indexed"].read_bytes()
    r = httpx.post(
        f"{server.url}/jobs",
        content=data[: len(data) * 6 // 10],
        headers={"content-type": "video/mp4"},
    )
    assert r.status_code == 202, r.text  # the probe reads only the header
    job = wait_for(server, r.json()["id"], ("done", "failed"))
    assert job["state"] == "failed" and "truncated" in job["error"], job
    assert_error(httpx.get(f"{server.url}/jobs/{job['id']}/result"), 409, "job_failed")
    assert job["id"] not in job_folders(jobs_dir)


def test_too_large_and_too_long(server, videos):
    big = np.random.default_rng(1).bytes(MAX_UPLOAD + 1)
    r = httpx.post(f"{server.url}/jobs", content=big, headers={"content-type": "video/mp4"})
    assert_error(r, 413, "payload_too_large")
    assert "SGZ_MAX_VIDEO_UPLOAD_BYTES" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is counted while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(f"{server.url}/jobs", content=chunks(), headers={"content-type": "video/mp4"})
    assert_error(r, 413, "payload_too_large")
    assert_error(submit(server, videos["too_long"]), 413, "video_too_long")


def test_unknown_job_is_404(server):
    for method, path in (
        ("GET", "/jobs/nope"),
        ("GET", "/jobs/nope/result"),
        ("DELETE", "/jobs/nope"),
    ):
        assert_error(httpx.request(method, server.url + path), 404, "unknown_job")


def test_queue_cancel_and_images_while_a_job_runs(server, videos, jobs_dir):
    running = submit(server, videos["long"], **SLOW).json()
    wait_for(server, running["id"], ("running",))
    queued = submit(server, videos["long"], **SLOW)
    assert queued.status_code == 202 and queued.json()["state"] == "queued"
    full = submit(server, videos["small"])
    assert_error(full, 503, "too_many_jobs")
    assert full.headers["retry-after"] == "7"
    assert_error(httpx.get(f"{server.url}/jobs/{running['id']}/result"), 409, "job_not_done")

    # images keep being answered, within about one batch of frames of their own time
    start = time.monotonic()
    r = httpx.post(
        f"{server.url}/enhance",
        content=photo((512, 512)).read_bytes(),
        headers={"content-type": "image/png"},
        timeout=30,
    )
    assert r.status_code == 200 and time.monotonic() - start < 10

    end = time.monotonic() + 30
    while (job := httpx.get(f"{server.url}/jobs/{running['id']}").json())["frames_done"] == 0:
        assert time.monotonic() < end
        time.sleep(0.1)
    assert job["state"] == "running" and job["frames_done"] < LONG
    assert job["frames_total"] == LONG and job["eta_s"] > 0
    assert running["id"] in job_folders(jobs_dir)
    cancelled = httpx.delete(f"{server.url}/jobs/{running['id']}", timeout=40)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert running["id"] not in job_folders(jobs_dir)
    assert httpx.get(f"{server.url}/jobs/{running['id']}").json()["state"] == "cancelled"
    assert_error(httpx.get(f"{server.url}/jobs/{running['id']}/result"), 409, "job_cancelled")

    second = queued.json()["id"]
    wait_for(server, second, ("running",))  # the queued one starts once the first stops
    assert httpx.delete(f"{server.url}/jobs/{second}", timeout=40).json()["state"] == "cancelled"
    assert second not in job_folders(jobs_dir)


def test_delete_a_finished_job_forgets_it(server, videos, jobs_dir):
    job = submit(server, videos["small"]).json()
    wait_for(server, job["id"], ("done",))
    assert list(jobs_dir.glob(f"*/{job['id']}/output.mp4"))
    r = httpx.delete(f"{server.url}/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["state"] == "done"
    assert job["id"] not in job_folders(jobs_dir)
    assert_error(httpx.get(f"{server.url}/jobs/{job['id']}"), 404, "unknown_job")


def test_metrics(server):
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "sgz_video_frames_total") >= 20 + 12 * 3
    assert metric(text, "sgz_job_duration_seconds_count", state="done") >= 3
    assert metric(text, "sgz_job_duration_seconds_count", state="failed") == 1
    assert metric(text, "sgz_job_duration_seconds_count", state="cancelled") == 2
    assert metric(text, "sgz_jobs", state="cancelled") == 2
    assert metric(text, "sgz_jobs", state="done") >= 2
    assert metric(text, "sgz_jobs", state="running") == 0
    assert metric(text, "sgz_requests_total", endpoint="/jobs/{job_id}", status="200") > 0


def test_disk_budget_and_expiry(videos, tmp_path):
    """A budget of 60 kB for job files, and results kept for one second (no warm-up: these
    jobs are too small to need one)."""
    s = Server(
        {
            "SGZ_JOBS_DIR": str(tmp_path),
            "SGZ_MAX_JOBS_DISK_BYTES": "60000",
            "SGZ_JOB_RESULT_TTL_S": "1",
            "SGZ_WARMUP": "false",
        }
    ).wait_ready()
    try:
        big = np.random.default_rng(2).bytes(70000)
        r = httpx.post(f"{s.url}/jobs", content=big, headers={"content-type": "video/mp4"})
        assert_error(r, 503, "disk_full")  # from Content-Length, before reading
        r = httpx.post(
            f"{s.url}/jobs",
            content=iter([big[:40000], big[40000:]]),
            headers={"content-type": "video/mp4"},
        )
        assert_error(r, 503, "disk_full")  # counted while reading
        job = submit(s, videos["small"]).json()
        assert wait_for(s, job["id"], ("done", "failed"))["state"] == "done"
        assert job["id"] in job_folders(tmp_path)
        time.sleep(1.8)  # the TTL, then a sweep (every TTL / 4)
        assert_error(httpx.get(f"{s.url}/jobs/{job['id']}"), 404, "unknown_job")
        assert job_folders(tmp_path) == set()
    finally:
        s.close()


def test_shutdown_cancels_running_jobs_and_removes_files(server, videos, jobs_dir):
    job = submit(server, videos["long"], **SLOW).json()
    wait_for(server, job["id"], ("running",))
    assert any(jobs_dir.iterdir())
    start = time.monotonic()
    assert server.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert time.monotonic() - start < 15  # cancelled, not run to the end
    assert list(jobs_dir.iterdir()) == []
    assert "job " + job["id"] + " cancelled" in server.log()
