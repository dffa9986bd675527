"""Service parts that need no server: the factor store, settings precedence, `sgz serve`
refusing to start without a usable model."""

import asyncio
import io
import os
import subprocess

import httpx
import numpy as np
import pytest
import torch
from sgz_server import SGZ, Server, photo
from starlette.requests import Request

from model import upsample_factor
from model.imageio import decode_image
from service.factor_store import STRIP_BYTES, FactorStore, full_npy_strip, npy_strips, render_factor
from service.settings import Settings
from service.uploads import client_gone


def lowres(h=9, w=16, value=0.0):
    return torch.full((3, h, w), value, dtype=torch.float32)


def test_factor_store_is_bounded_by_count_oldest_first():
    store = FactorStore(max_items=2, max_bytes=1 << 20)
    a, b, c = (store.put(lowres(), (108, 192)) for _ in range(3))
    assert len({a, b, c}) == 3  # a fresh id each time
    assert store.get(a) is None and store.get(b) and store.get(c)
    assert len(store) == 2 and store.nbytes == 2 * lowres().numel() * 4


def test_factor_store_is_bounded_by_bytes():
    one = lowres().numel() * 4
    store = FactorStore(max_items=100, max_bytes=2 * one + 1)
    a, b = store.put(lowres(), (1, 1)), store.put(lowres(value=0.5), (1, 1))
    assert len(store) == 2 and store.nbytes == 2 * one
    assert store.get(b).lowres[0, 0, 0] == 0.5
    store.put(lowres(), (1, 1))  # over the byte limit: the oldest (a) goes
    assert store.get(a) is None and store.nbytes == 2 * one
    assert store.put(lowres(100, 100), (1, 1)) is None  # can never fit: not stored
    assert len(store) == 2
    assert FactorStore(0, 1 << 20).put(lowres(), (1, 1)) is None


def test_stored_map_is_low_res_and_rendered_at_full_size(published_enhancer):
    image = decode_image(photo((512, 512)).read_bytes()).to_tensor()
    _, r_low = published_enhancer.enhance(image, return_factor=True)
    store = FactorStore(10, 1 << 20)
    entry = store.get(store.put(r_low[0], (512, 512)))
    assert entry.nbytes * 100 < 3 * 512 * 512 * 4  # ~144x smaller than the full map
    strips = [full_npy_strip(entry, y0, y1) for y0, y1 in npy_strips(entry)]
    assert len(strips) > 1 and max(map(len, strips)) <= STRIP_BYTES + 128  # + the header
    full = np.load(io.BytesIO(b"".join(strips)))
    expected = upsample_factor(r_low, (512, 512))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(full, expected, atol=1e-6)
    low = np.load(io.BytesIO(render_factor(entry, "npy", full=False)))
    np.testing.assert_array_equal(low, r_low[0].permute(1, 2, 0).numpy())
    picture = decode_image(render_factor(entry, "png", full=True))
    assert picture.size == (512, 512) and picture.format == "PNG"
    assert decode_image(render_factor(entry, "png", full=False)).size == low.shape[1::-1]


def test_settings_flags_beat_environment_beat_defaults(monkeypatch):
    assert Settings.model_construct().port == 8000
    monkeypatch.setenv("SGZ_PORT", "9001")
    monkeypatch.setenv("SGZ_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("SGZ_API_KEY", "")  # empty means unset
    settings = Settings()
    assert settings.port == 9001 and settings.max_batch_size == 4 and settings.api_key is None
    assert Settings(port=9002).port == 9002
    # one I/O thread per core for decoding (and as many for encoding), at least 4, at most 16
    assert Settings().io_threads == min(16, max(4, os.cpu_count()))


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--checkpoint", "/nonexistent/model.pt"], {}, "/nonexistent/model.pt"),
        (["--checkpoint", "{garbage}"], {}, "garbage.pt"),
        (["--device", "nonsense"], {}, "cannot load the model"),
        ([], {"SGZ_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ],
)
def test_sgz_serve_refuses_to_start_without_a_usable_model(tmp_path, args, env, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    args = [a.replace("{garbage}", str(garbage)) for a in args]
    if "--checkpoint" not in args:
        from conftest import SGZ_PUBLISHED

        args += ["--checkpoint", str(SGZ_PUBLISHED)]
    result = subprocess.run(
        [str(SGZ), "serve", "--port", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "sgz serve: cannot load the model: " if env == {} else "sgz serve: invalid setting: "
    )
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_client_gone_steps_receive_once_and_leaves_nothing_waiting():
    """The disconnect check used before a batch runs: a receive() with nothing to say yet
    is abandoned without a trace; a disconnect is seen at once and remembered."""

    async def main():
        arrived = asyncio.Event()
        messages = []

        async def receive():
            if not messages:
                await arrived.wait()
            return messages.pop(0)

        request = Request({"type": "http", "method": "POST", "headers": []}, receive)
        assert await client_gone(request) is False
        assert not arrived._waiters  # the abandoned receive() left no waiter behind
        messages.append({"type": "http.disconnect"})
        assert await client_gone(request) is True
        assert await client_gone(request) is True  # remembered: receive() is not called again

    asyncio.run(main())


def test_a_lone_request_does_not_wait_for_the_batch_timer():
    """Early dispatch, end to end: with a 3 s batch timer, a request alone in the service
    (nothing else being read or decoded) runs at once; queue time is in Server-Timing."""
    server = Server({"SGZ_MAX_WAIT_MS": "3000"}).wait_ready()
    try:
        for _ in range(2):
            r = httpx.post(
                f"{server.url}/enhance",
                content=photo((512, 512)).read_bytes(),
                headers={"content-type": "image/png"},
                timeout=30,
            )
            assert r.status_code == 200
            timing = dict(
                part.strip().split(";dur=") for part in r.headers["server-timing"].split(",")
            )
            assert float(timing["queue"]) < 1000, timing
    finally:
        server.close()
