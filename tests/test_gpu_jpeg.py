"""JPEG coding on the GPU (model/gpu_jpeg.py): which path is chosen and why, on every machine;
and on a GPU with nvImageCodec (scripts/gpu-check.sh codec), that it decodes and encodes like
the CPU path and that the service answers through it."""

import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import SICE
from PIL import Image
from sgz_server import DEVICE, Server, metric, photo

from model.gpu_jpeg import BatchLane, GpuDecoded, open_gpu_jpeg, upright_rgb_jpeg
from model.imageio import decode_image, encode_image
from service.inference import ENHANCE, Work, run_batch


def nvimgcodec_installed() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


ON_GPU = torch.cuda.is_available() and nvimgcodec_installed()
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and nvImageCodec")


def jpeg(path, size=None, **save) -> bytes:
    img = Image.open(path).convert("RGB")
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


# -- which path, on any machine


def test_cpu_model_codes_jpeg_on_the_cpu_and_says_why():
    gpu, why = open_gpu_jpeg("auto", "cpu")
    assert gpu is None and "the model runs on cpu" in why
    gpu, why = open_gpu_jpeg("cpu", "cuda:0")
    assert gpu is None and "asked for" in why
    with pytest.raises(ValueError, match="auto, gpu, cpu"):
        open_gpu_jpeg("nvjpeg", "cpu")


def test_without_nvimgcodec_a_gpu_model_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import raises ImportError
    if "nvidia" in sys.modules:  # where it is installed and imported already
        monkeypatch.delattr(sys.modules["nvidia"], "nvimgcodec", raising=False)
    gpu, why = open_gpu_jpeg("auto", "cuda:0")
    assert gpu is None and "nvImageCodec is not installed" in why and "jpeg-cu12" in why


def test_only_upright_colour_jpegs_are_offered_to_the_gpu(tmp_path):
    src = photo((512, 512))
    assert upright_rgb_jpeg(jpeg(src)) == (512, 512)
    assert upright_rgb_jpeg(jpeg(src, (300, 200))) == (300, 200)
    gray = io.BytesIO()
    Image.open(src).convert("L").save(gray, "JPEG")
    assert upright_rgb_jpeg(gray.getvalue()) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the CPU path applies it
    assert upright_rgb_jpeg(jpeg(src, exif=exif.tobytes())) is None
    assert upright_rgb_jpeg(src.read_bytes()) is None  # a PNG
    assert upright_rgb_jpeg(b"\xff\xd8\xff" + b"\0" * 64) is None  # a broken header
    assert upright_rgb_jpeg(b"") is None


def test_answers_asked_on_device_stay_on_the_models_device():
    from model import load_model

    enhancer = load_model(device="cpu")
    image = decode_image(jpeg(photo((512, 512)), (96, 64))).to_tensor()
    works = [Work(image, 1.0, ENHANCE, on_device=True), Work(image, 0.5, ENHANCE)]
    out = run_batch(enhancer, works)
    assert [o.image.shape for o in out] == [(1, 3, 64, 96)] * 2
    assert all(o.image.device == enhancer.device for o in out)


def test_batch_lane_gathers_calls_from_threads_and_answers_each_its_own():
    """The lane that batches GPU coding, run here with libjpeg-turbo as its batch function:
    every caller gets its own image back, calls queued while a batch runs form the next one."""
    sent = [jpeg(f, (96 + 8 * i, 64)) for i, f in enumerate(sorted(SICE.glob("*.png"))[:12])]
    seen_threads, sizes = set(), []

    def decode_all(batch):
        seen_threads.add(threading.current_thread().name)
        sizes.append(len(batch))
        time.sleep(0.02)  # a batch takes a while: meanwhile the others queue
        return [decode_image(data).rgb for data in batch]

    lane = BatchLane("test-lane", decode_all, max_batch=5)
    try:
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lane, sent * 3))
        assert seen_threads == {"test-lane"} and max(sizes) == 5 and sum(sizes) == 36
        assert lane.batches == len(sizes) < 36 and lane.items == 36
        for data, rgb in zip(sent * 3, got, strict=True):
            assert np.array_equal(rgb, decode_image(data).rgb)
        assert lane(sent[0]).shape == (64, 96, 3)  # alone: a batch of one, at once
        assert sizes[-1] == 1
    finally:
        lane.close()


def test_batch_lane_failure_reaches_the_whole_batch_and_the_lane_goes_on():
    calls = []

    def fails_first(batch):
        calls.append(list(batch))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")
        return [x * 2 for x in batch]

    lane = BatchLane("test-lane", fails_first, max_batch=8)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            lane(1)
        assert lane(21) == 42
    finally:
        lane.close()
    assert not any(t.name == "test-lane" for t in threading.enumerate())


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU service's choice")
def test_service_on_the_cpu_reports_cpu_coding_and_refuses_a_gpu_it_cannot_have():
    with Server({"SGZ_JPEG_CODEC": "auto"}) as s:
        ready = httpx.get(s.url + "/readyz").json()
        assert ready["jpeg_codec"] == "cpu"
        assert "JPEG coding on the CPU: the model runs on cpu" in s.log()
        r = httpx.post(s.url + "/enhance", files={"image": ("a.jpg", jpeg(photo((512, 512))))})
        assert r.status_code == 200 and r.content.startswith(b"\xff\xd8")
        text = httpx.get(s.url + "/metrics").text
        for stage in ("decode", "encode"):
            assert metric(text, "sgz_images_coded_total", stage=stage, device="cpu") == 1
            assert metric(text, "sgz_images_coded_total", stage=stage, device="gpu") == 0
    s = Server({"SGZ_JPEG_CODEC": "gpu"})
    try:
        with pytest.raises(RuntimeError, match="exited"):
            s.wait_ready(60)
        assert "SGZ_JPEG_CODEC=gpu, but the model runs on cpu" in s.log()
    finally:
        s.close()


# -- on a GPU with nvImageCodec


@pytest.fixture(scope="module")
def gpu():
    codec, why = open_gpu_jpeg("gpu", "cuda")
    assert codec is not None, why
    return codec


def sice_jpegs(n=6):
    files = sorted(SICE.glob("*.png"))[:: max(1, len(list(SICE.glob("*.png"))) // n)][:n]
    return [jpeg(f) for f in files]


@gpu_only
def test_gpu_decode_matches_libjpeg_turbo(gpu):
    for data in sice_jpegs():
        meta, tensor = gpu.decode(data, None)
        assert isinstance(meta, GpuDecoded) and tensor.is_cuda
        ref = decode_image(data).rgb.astype(np.int16)
        got = tensor[0].permute(1, 2, 0).cpu().numpy().astype(np.int16)
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        # nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's
        assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())


@gpu_only
def test_gpu_encode_is_a_standard_jpeg_as_good_as_the_cpus(gpu):
    for data in sice_jpegs(3):
        rgb = decode_image(data).rgb
        ours = gpu.encode(torch.from_numpy(rgb).permute(2, 0, 1)[None].cuda(), 90)
        cpu = encode_image(rgb, None, False, "JPEG", 90)
        back = np.asarray(Image.open(io.BytesIO(ours)).convert("RGB")).astype(float)
        ref = np.asarray(Image.open(io.BytesIO(cpu)).convert("RGB")).astype(float)
        err, err_cpu = np.abs(back - rgb).mean(), np.abs(ref - rgb).mean()
        assert err < err_cpu * 1.25 + 0.1, (err, err_cpu)
        assert 0.5 < len(ours) / len(cpu) < 1.5


@gpu_only
def test_gpu_batches_code_like_single_calls(gpu):
    batched, why = open_gpu_jpeg("gpu", "cuda", batch=8)
    assert batched is not None and "in batches of up to 8" in why
    decode_lane, encode_lane = batched._lanes
    before = decode_lane.items, encode_lane.items  # the start-up self-test's
    sent = sice_jpegs(6) + [photo((512, 512)).read_bytes(), b"\xff\xd8\xff\xe0garbage"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda d: batched.decode(d, None), sent * 2))
    for data, result in zip(sent * 2, got, strict=True):
        single = gpu.decode(data, None)
        if single is None:
            assert result is None
            continue
        assert result[0] == single[0] and result[1].shape == single[1].shape
        # batches may go to the GPU's hardware JPEG decoder, which rounds its own way
        assert (result[1].float() - single[1].float()).abs().mean() < 1.0
    pixels = [r[1] for r in got if r is not None]
    with ThreadPoolExecutor(8) as pool:
        coded = list(pool.map(lambda t: batched.encode(t, 90), pixels))
    for tensor, data in zip(pixels, coded, strict=True):
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
        rgb = tensor[0].permute(1, 2, 0).cpu().numpy().astype(float)
        assert np.abs(back - rgb).mean() < 3.0
    # the PNG and the garbage never reach the lane: the CPU's
    assert (decode_lane.items, encode_lane.items) == (before[0] + 12, before[1] + len(pixels))


@gpu_only
def test_gpu_declines_what_the_cpu_path_answers(gpu):
    src = photo((512, 512))
    assert gpu.decode(src.read_bytes(), None) is None  # PNG
    assert gpu.decode(jpeg(src), 512 * 511) is None  # over the limit: the CPU says so
    assert gpu.decode(b"\xff\xd8\xff\xe0garbage", None) is None


@gpu_only
@pytest.mark.skipif(DEVICE != "cuda", reason="SGZ_TEST_DEVICE=cuda runs the served model on it")
def test_service_codes_jpeg_on_the_gpu_like_the_cpu():
    sent = sice_jpegs(4)
    answers = {}
    for codec in ("gpu", "cpu"):
        with Server({"SGZ_JPEG_CODEC": codec}) as s:
            assert httpx.get(s.url + "/readyz").json()["jpeg_codec"] == codec
            answers[codec] = []
            for data in sent:
                r = httpx.post(s.url + "/enhance", files={"image": ("a.jpg", data)}, timeout=60)
                assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
                answers[codec].append(np.asarray(Image.open(io.BytesIO(r.content))).astype(float))
            png = httpx.post(
                s.url + "/enhance", files={"image": ("a.png", photo((512, 512)).read_bytes())}
            )
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            bad = httpx.post(s.url + "/enhance", files={"image": ("a.jpg", sent[0][:3000])})
            assert bad.status_code in (200, 400)  # as the CPU path: truncated JPEGs may decode
            text = httpx.get(s.url + "/metrics").text
            for stage in ("decode", "encode"):  # the four JPEGs on the chosen device
                assert metric(text, "sgz_images_coded_total", stage=stage, device=codec) >= 4
    for a, b in zip(answers["gpu"], answers["cpu"], strict=True):
        assert a.shape == b.shape and np.abs(a - b).mean() < 2.0
