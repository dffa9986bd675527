"""End to end: the real `sgz serve` on a free port, real HTTP, real photos from sice-real.

One server for this module, with limits small enough to hit with the shared photos:
SGZ_MAX_PIXELS below 4K, SGZ_MAX_UPLOAD_BYTES above every shared PNG.
"""

import asyncio
import functools
import http.client
import io
import json
import re
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import LOL, SICE
from PIL import Image
from sgz_server import DEVICE, FACTOR_ATOL, Server, assert_error, metric, photo

from model.imageio import decode_image, factor_to_picture

MAX_UPLOAD = 2_000_000
MAX_PIXELS = 4_000_000  # 1920x1080 fits, 3840x2160 does not


@pytest.fixture(scope="module")
def server():
    s = Server(
        {
            "SGZ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "SGZ_MAX_PIXELS": str(MAX_PIXELS),
            "SGZ_MAX_WAIT_MS": "20",
            "SGZ_MAX_BATCH_SIZE": "16",
        }
    )
    try:
        yield s.wait_ready()
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def as_tensor(data: bytes) -> torch.Tensor:
    return decode_image(data).to_tensor()


def assert_enhanced(response: httpx.Response, source: bytes, enhancer, strength=1.0, **options):
    assert response.status_code == 200, response.text
    got = as_tensor(response.content)
    image = as_tensor(source)
    assert got.shape == image.shape
    diff = (got.int() - enhancer.enhance(image, strength, **options).int()).abs().max().item()
    assert diff <= 1, f"response differs from enhancer.enhance by {diff} grey levels"


def test_health_readiness_and_offline_docs(client, published_enhancer):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checkpoint_sha256"] == published_enhancer.sha256
    docs = client.get("/docs")
    assert docs.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/enhance", "/factor", "/factor/{factor_id}", "/healthz", "/readyz", "/metrics"} <= set(
        paths
    )
    assert "multipart/form-data" in paths["/enhance"]["post"]["requestBody"]["content"]


def test_enhance_multipart(client, published_enhancer):
    source = photo((512, 512)).read_bytes()
    r = client.post("/enhance", files={"image": ("dark.png", source, "image/png")})
    assert_enhanced(r, source, published_enhancer)
    assert r.headers["content-type"] == "image/png"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", r.headers["server-timing"]))
    assert set(timing) == {"queue", "inference", "decode", "encode"}
    assert float(timing["inference"]) > 0 and float(timing["decode"]) > 0


def test_enhance_multipart_larger_than_starlettes_spool(client, published_enhancer):
    """A part over 1 MB (Starlette would spool it to a file) is read in memory, intact."""
    source = photo((1920, 1080)).read_bytes()
    assert len(source) > 1024 * 1024
    r = client.post("/enhance", files={"image": ("dark.png", source, "image/png")})
    assert_enhanced(r, source, published_enhancer)


def test_enhance_raw_body_strength_and_output_formats(client, published_enhancer):
    source = photo((1920, 1080)).read_bytes()
    r = client.post(
        "/enhance", params={"strength": 0.5}, content=source, headers={"content-type": "image/png"}
    )
    assert_enhanced(r, source, published_enhancer, strength=0.5)
    for fmt, media in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
        r = client.post(
            "/enhance",
            params={"format": fmt, "quality": 80},
            content=source,
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 200 and r.headers["content-type"] == media
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == fmt.upper() and im.size == (1920, 1080)


def test_denoise_and_exposure_parameters(client, published_enhancer):
    """Each option reaches the model: the answer is `enhance` with the same options, and
    denoise=0 with exposure=model is the network alone."""
    source = (LOL / "low" / "14.png").read_bytes()
    answers = {}
    for params, options in (
        ({}, {}),
        ({"denoise": 0, "exposure": "model"}, {"denoise": 0, "exposure": None}),
        ({"denoise": 2.5, "exposure": "0.5"}, {"denoise": 2.5, "exposure": 0.5}),
    ):
        r = client.post(
            "/enhance", params=params, content=source, headers={"content-type": "image/png"}
        )
        assert_enhanced(r, source, published_enhancer, **options)
        answers[str(params)] = as_tensor(r.content).float()
    plain, default, bright = answers.values()
    lift = float(bright.mean() - default.mean()) / 255
    assert abs(float(bright.mean()) / 255 - 0.5) < 0.03 < lift
    assert not torch.equal(plain, default)


def test_client_request_id_is_kept_when_valid(client):
    source = photo((512, 512)).read_bytes()
    r = client.post(
        "/enhance",
        content=source,
        headers={"content-type": "image/png", "x-request-id": "cam-7.frame-42"},
    )
    assert r.headers["x-request-id"] == "cam-7.frame-42"
    r = client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_factor_by_factor_id_as_picture_and_npy(client, published_enhancer):
    source = photo((1920, 1080)).read_bytes()
    image = as_tensor(source)
    r = client.post(
        "/enhance", params={"strength": 0.8}, content=source, headers={"content-type": "image/png"}
    )
    assert r.status_code == 200
    factor_id = r.headers["x-factor-id"]
    _, r_low = published_enhancer.enhance(image, 0.8, return_factor=True)
    from model import upsample_factor

    expected = upsample_factor(r_low, (1080, 1920))[0]

    npy = client.get(f"/factor/{factor_id}", params={"format": "npy", "size": "full"})
    assert npy.status_code == 200
    x_r = np.load(io.BytesIO(npy.content))
    assert x_r.shape == (1080, 1920, 3) and x_r.dtype == np.float32
    np.testing.assert_allclose(x_r, expected.permute(1, 2, 0).numpy(), atol=FACTOR_ATOL)

    png = client.get(f"/factor/{factor_id}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    diff = np.abs(picture.astype(int) - factor_to_picture(expected).astype(int)).max()
    assert diff <= 1

    assert_error(client.get("/factor/never-seen"), 404, "unknown_factor_id")


def test_post_factor_computes_the_map_and_keeps_it(client, published_enhancer):
    source = photo((512, 512)).read_bytes()
    r = client.post(
        "/factor",
        params={"format": "npy", "size": "full"},
        files={"image": ("dark.png", source, "image/png")},
    )
    assert r.status_code == 200, r.text
    x_r = np.load(io.BytesIO(r.content))
    expected = published_enhancer.factor(as_tensor(source))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(x_r, expected, atol=FACTOR_ATOL)
    again = client.get(
        f"/factor/{r.headers['x-factor-id']}", params={"format": "npy", "size": "full"}
    )
    assert again.content == r.content


def _bomb() -> bytes:
    """400 megapixels of black in a 48 kB PNG."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


@functools.cache
def bad_inputs():
    good = photo((512, 512)).read_bytes()
    png = {"content-type": "image/png"}
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
    return {
        "not an image": (dict(content=b"hello, I am text", headers=png), 415, "unsupported_image"),
        "svg": (
            dict(content=svg, headers={"content-type": "image/svg+xml"}),
            415,
            "unsupported_image",
        ),
        "truncated": (dict(content=good[: len(good) // 2], headers=png), 400, "corrupt_image"),
        "empty raw": (dict(content=b"", headers=png), 400, "empty_image"),
        "empty file": (dict(files={"image": ("a.png", b"", "image/png")}), 400, "empty_image"),
        "text content type": (
            dict(content=good, headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        "no content type": (
            dict(content=good, headers={"content-type": ""}),
            415,
            "unsupported_media_type",
        ),
        "wrong field": (dict(files={"photo": ("a.png", good, "image/png")}), 400, "missing_image"),
        "broken multipart": (
            dict(
                content=b"--x\r\nnonsense",
                headers={"content-type": "multipart/form-data; boundary=x"},
            ),
            400,
            "missing_image",
        ),
        "multipart without boundary": (
            dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data"}),
            400,
            "bad_multipart",
        ),
        "too many pixels": (
            dict(content=photo((3840, 2160)).read_bytes(), headers=png),
            413,
            "image_too_large",
        ),
        "decompression bomb": (dict(content=_bomb(), headers=png), 413, "image_too_large"),
    }


BAD_INPUTS = [
    "not an image",
    "svg",
    "truncated",
    "empty raw",
    "empty file",
    "text content type",
    "no content type",
    "wrong field",
    "broken multipart",
    "multipart without boundary",
    "too many pixels",
    "decompression bomb",
]


def test_every_bad_input_is_tested():
    assert sorted(bad_inputs()) == sorted(BAD_INPUTS)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_a_specific_4xx_and_the_service_keeps_working(
    client, published_enhancer, case
):
    kwargs, status, error = bad_inputs()[case]
    assert_error(client.post("/enhance", **kwargs), status, error)
    assert_error(client.post("/factor", **kwargs), status, error)


def test_bad_query_parameters_are_422(client):
    source = photo((512, 512)).read_bytes()
    for params in (
        {"strength": 1.5},
        {"strength": -0.1},
        {"strength": "x"},
        {"format": "gif"},
        {"quality": 0},
        {"denoise": -1},
        {"denoise": 4.5},
        {"denoise": "nan"},
        {"exposure": "bright"},
        {"exposure": "1.5"},
        {"exposure": "0"},
        {"exposure": "x" * 100},
    ):
        r = client.post(
            "/enhance", params=params, content=source, headers={"content-type": "image/png"}
        )
        assert_error(r, 422, "invalid_parameter")
    assert_error(client.get("/factor/x", params={"format": "tiff"}), 422, "invalid_parameter")
    assert_error(client.get("/no/such/path"), 404, "not_found")
    assert_error(client.get("/enhance"), 405, "method_not_allowed")


def test_upload_over_the_limit_is_413(client, tmp_path):
    big = tmp_path / "big.bmp"  # a real photo, uncompressed: 6 MB
    Image.open(photo((1920, 1080))).save(big)
    data = big.read_bytes()
    assert len(data) > MAX_UPLOAD
    assert_error(
        client.post("/enhance", content=data, headers={"content-type": "image/bmp"}),
        413,
        "payload_too_large",
    )
    assert_error(
        client.post("/enhance", files={"image": ("big.bmp", data, "image/bmp")}),
        413,
        "payload_too_large",
    )


def _raw_request(port: int, head: bytes, body_chunks=()) -> tuple[int, bytes]:
    """Send a request by hand whose body never ends (no last chunk): an answer proves the
    server judged the upload while reading it."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_upload_limit_is_enforced_while_reading(server):
    lying = (
        b"POST /enhance HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    assert _raw_request(server.port, lying)[0] == 413  # no byte of the body was sent

    data = photo((3840, 2160)).read_bytes() * 2
    chunks = [data[i : i + 65536] for i in range(0, MAX_UPLOAD + 65536, 65536)]
    chunked = b"Host: x\r\nTransfer-Encoding: chunked\r\n"
    raw = b"POST /enhance HTTP/1.1\r\nContent-Type: image/png\r\n" + chunked + b"\r\n"
    status, body = _raw_request(server.port, raw, chunks)
    assert status == 413 and json.loads(body)["error"] == "payload_too_large"

    boundary = b"sgzboundary"
    part = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
        b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    multipart = (
        b"POST /factor HTTP/1.1\r\nContent-Type: multipart/form-data; boundary="
        + boundary
        + b"\r\n"
        + chunked
        + b"\r\n"
    )
    status, body = _raw_request(server.port, multipart, [part] + chunks)
    assert status == 413 and json.loads(body)["error"] == "payload_too_large"


def test_concurrent_requests_are_batched_and_all_correct(server, published_enhancer, tmp_path):
    """64 requests at once: batches larger than one form, every answer is right."""
    files = []
    full_hd = [f for f in sorted(SICE.glob("*.png")) if sorted(Image.open(f).size) == [1080, 1920]]
    for i, f in enumerate(full_hd[:16]):  # either orientation: two sizes of crop
        with Image.open(f) as im:
            w, h = (600, 400) if im.width > im.height else (400, 600)
            left, top = (i * 97) % (im.width - w), (i * 61) % (im.height - h)
            crop = tmp_path / f"crop{i:02d}.png"
            im.crop((left, top, left + w, top + h)).save(crop)
            files.append(crop)
    jobs = [(files[i % len(files)], (1.0, 0.6)[i // len(files) % 2]) for i in range(64)]
    before = httpx.get(f"{server.url}/metrics").text

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/enhance",
                        params={"strength": s, "format": "png"},
                        files={"image": (f.name, f.read_bytes(), "image/png")},
                    )
                    for f, s in jobs
                )
            )

    start = time.perf_counter()
    responses = asyncio.run(send_all())
    elapsed = time.perf_counter() - start
    after = httpx.get(f"{server.url}/metrics").text

    expected = {}  # enhance on each crop, a stack of same-size crops at a time
    shapes = {f: as_tensor(f.read_bytes()).shape for f in files}
    for s in (1.0, 0.6):
        for shape in set(shapes.values()):
            group = [f for f in files if shapes[f] == shape]
            out = published_enhancer.enhance(
                torch.cat([as_tensor(f.read_bytes()) for f in group]), s
            )
            expected.update({(f, s): out[i : i + 1].int() for i, f in enumerate(group)})
    for (f, s), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        got = as_tensor(r.content)
        assert got.shape == expected[f, s].shape
        assert (got.int() - expected[f, s]).abs().max().item() <= 1, f.name
    batches = metric(after, "sgz_batch_size_count") - metric(before, "sgz_batch_size_count")
    singles = metric(after, "sgz_batch_size_bucket", le="1.0") - metric(
        before, "sgz_batch_size_bucket", le="1.0"
    )
    images = metric(after, "sgz_images_processed_total") - metric(
        before, "sgz_images_processed_total"
    )
    assert images == 64
    assert batches - singles > 0, "no batch larger than one image"
    print(
        f"64 requests in {elapsed:.1f} s, {batches:.0f} forward passes, "
        f"mean batch {images / batches:.1f}"
    )


def test_metrics_content(client, published_enhancer):
    client.post(
        "/enhance", content=photo((512, 512)).read_bytes(), headers={"content-type": "image/png"}
    )
    client.post("/enhance", content=b"nope", headers={"content-type": "image/png"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "sgz_requests_total", endpoint="/enhance", status="200") >= 1
    assert metric(text, "sgz_requests_total", endpoint="/enhance", status="415") >= 1
    assert metric(text, "sgz_request_duration_seconds_count", endpoint="/enhance") >= 2
    for name in (
        "sgz_queue_wait_seconds",
        "sgz_inference_seconds",
        "sgz_decode_seconds",
        "sgz_encode_seconds",
        "sgz_batch_size",
    ):
        assert metric(text, f"{name}_count") >= 1, name
        assert f'{name}_bucket{{le="+Inf"}}' in text
    assert metric(text, "sgz_images_processed_total") >= 1
    assert metric(text, "sgz_megapixels_processed_total") > 0
    assert "sgz_queue_depth 0.0" in text
    assert metric(text, "sgz_in_flight_requests") == 1  # this scrape
    assert (
        metric(
            text,
            "sgz_model_info",
            checkpoint_sha256=published_enhancer.sha256,
            device=DEVICE,
            checkpoint_source="published",
        )
        == 1
    )
    assert metric(text, "sgz_model_info", torch_version=torch.__version__) == 1
