"""The model package: EFE size, parity with the published inference code, any image size,
factor maps, and checkpoint files (ours and the published raw state dicts)."""

import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SGZ_PUBLISHED, SICE, ZERO_DCE_PP_PUBLISHED
from PIL import Image

from model import (
    DEFAULT_CHECKPOINT,
    EFE,
    CheckpointError,
    EFEConfig,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from model.checkpoint import efe_config, state_dict_sha256

NET = {"denoise": 0, "exposure": None}  # EFE + RIE alone: the paper's network


def sice(name: str, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """A real photo from sice-real as a (1, 3, H, W) uint8 tensor, optionally cropped."""
    img = Image.open(SICE / name).convert("RGB")
    if box is not None:
        img = img.crop(box)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]


def reference_enhance(state_dict: dict, images: torch.Tensor) -> torch.Tensor:
    """The published inference code, written out from its equations on the raw state dict."""

    def block(i, t):  # depthwise 3x3 (groups = channels), then pointwise 1x1
        p = f"e_conv{i}"
        t = F.conv2d(
            t,
            state_dict[f"{p}.depth_conv.weight"],
            state_dict[f"{p}.depth_conv.bias"],
            padding=1,
            groups=t.shape[1],
        )
        return F.conv2d(t, state_dict[f"{p}.point_conv.weight"], state_dict[f"{p}.point_conv.bias"])

    x = images.float() / 255
    low = F.interpolate(x, scale_factor=1 / 12, mode="bilinear")  # published scale factor 12
    x1 = F.relu(block(1, low))
    x2 = F.relu(block(2, x1))
    x3 = F.relu(block(3, x2))
    x4 = F.relu(block(4, x3))
    x5 = F.relu(block(5, torch.cat([x3, x4], 1)))
    x6 = F.relu(block(6, torch.cat([x2, x5], 1)))
    x_r = torch.tanh(block(7, torch.cat([x1, x6], 1)))
    x_r = F.interpolate(x_r, scale_factor=12, mode="bilinear", align_corners=True)
    y = x
    for _ in range(8):  # RIE, Eq. 1, eight steps
        y = y + x_r * (y**2 - y)
    return torch.round(255 * y.clamp(0, 1)).to(torch.uint8)


# Real photos cropped so both sides are multiples of 12 (the published code's requirement):
# a 512x512 indoor scene and a 600x396 piece of a dark 1080p street scene.
PARITY_CROPS = [("761_0_.png", (4, 4, 508, 508)), ("474_0_.png", (240, 600, 840, 996))]


def test_efe_has_the_papers_parameter_count():
    assert sum(p.numel() for p in EFE().parameters()) == 10_561  # paper: 0.011 M


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize(
    "checkpoint", [SGZ_PUBLISHED, ZERO_DCE_PP_PUBLISHED], ids=["sgz", "zero-dce-pp"]
)
def test_parity_with_published_inference(checkpoint, backend):
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    enhancer = load_model(checkpoint, backend=backend, device="cpu")
    for name, box in PARITY_CROPS:
        images = sice(name, box)
        assert images.shape[-1] % 12 == 0 and images.shape[-2] % 12 == 0
        with torch.inference_mode():
            expected = reference_enhance(state_dict, images)
        out = enhancer.enhance(images, **NET)
        assert out.shape == images.shape and out.dtype == torch.uint8
        diff = (out.int() - expected.int()).abs()
        assert diff.max() <= 1, f"{name}: {int(diff.max())} grey levels off"
        assert (diff == 0).float().mean() > 0.99
        assert (out.int() - images.int()).abs().float().mean() > 2, "the model changed nothing"


def test_parity_on_a_full_size_photo(published_enhancer):
    state_dict = torch.load(SGZ_PUBLISHED, map_location="cpu", weights_only=True)
    images = sice("474_1_.png")  # 1080x1920: both sides multiples of 12
    with torch.inference_mode():
        expected = reference_enhance(state_dict, images)
    assert (published_enhancer.enhance(images, **NET).int() - expected.int()).abs().max() <= 1


def test_dark_photo_is_brightened(published_enhancer):
    images = sice("101_0_.png")
    assert published_enhancer.enhance(images).float().mean() > images.float().mean() + 20


@pytest.mark.parametrize("size", [(1, 1), (13, 7), (4001, 3), (7, 13), (11, 11)])
def test_any_size_gives_output_of_input_size(published_enhancer, size):
    w, h = size
    strip = Image.open(SICE / "512_0_.png").convert("RGB").crop((0, 1000, 3840, 1000 + h))
    images = torch.from_numpy(np.asarray(strip.resize((w, h), Image.BILINEAR)).copy())
    images = images.permute(2, 0, 1)[None]
    out = published_enhancer.enhance(images, **NET)
    assert out.shape == (1, 3, h, w) and out.dtype == torch.uint8
    # the full-size factor map drives RIE: enhance == round(255 * rie(x, factor(x)))
    r = published_enhancer.factor(images)
    assert r.shape == (1, 3, h, w)
    y = images.float() / 255
    for _ in range(published_enhancer.steps):
        y = y + r * (y * y - y)
    assert (out.int() - torch.round(255 * y.clamp(0, 1)).int()).abs().max() <= 1


def test_factor_map_shape_range_and_dtype(published_enhancer):
    images = torch.cat([sice("101_0_.png", (0, 0, 300, 200)), sice("761_0_.png", (0, 0, 300, 200))])
    r = published_enhancer.factor(images)
    assert r.shape == images.shape and r.dtype == torch.float32
    assert r.min() >= -1 and r.max() <= 1
    assert r.std() > 0.01, "a constant factor map"
    assert (r[0] - r[1]).abs().mean() > 0.005, "two scenes, one factor map"


def test_batch_equals_images_one_by_one(published_enhancer):
    images = torch.cat([sice("101_0_.png", (0, 0, 240, 180)), sice("761_0_.png", (0, 0, 240, 180))])
    batch = published_enhancer.enhance(images)
    for i in range(2):
        single = published_enhancer.enhance(images[i : i + 1])
        assert (batch[i : i + 1].int() - single.int()).abs().max() <= 1


def test_strength_zero_is_identity_and_strength_scales(published_enhancer):
    images = sice("101_0_.png", (0, 0, 256, 192))
    assert torch.equal(published_enhancer.enhance(images, strength=0.0, **NET), images)
    half = published_enhancer.enhance(images, strength=0.5).float().mean()
    full = published_enhancer.enhance(images).float().mean()
    assert images.float().mean() < half < full
    with pytest.raises(ValueError, match="strength"):
        published_enhancer.enhance(images, strength=1.5)


def test_enhance_rejects_wrong_inputs(published_enhancer):
    with pytest.raises(TypeError, match="uint8"):
        published_enhancer.enhance(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        published_enhancer.enhance(torch.zeros(3, 8, 8, dtype=torch.uint8))


# --- checkpoints ---------------------------------------------------------------------------


def trained_efe(seed: int = 0) -> EFE:
    efe = EFE()
    efe.init_weights(generator=torch.Generator().manual_seed(seed))
    return efe


def test_checkpoint_round_trip_keeps_metadata_and_hash(tmp_path):
    efe = trained_efe()
    recipe = {"epochs": 100, "lr": 1e-4, "losses": {"spa": 1, "rgb": 5}}
    digest = save_checkpoint(tmp_path / "c.pt", efe, scale_factor=12, steps=8, recipe=recipe)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert (ckpt.source, ckpt.scale_factor, ckpt.steps, ckpt.recipe) == ("sgz-serve", 12, 8, recipe)
    assert ckpt.sha256 == digest and len(digest) == 64
    for k, v in efe.state_dict().items():
        assert torch.equal(ckpt.state_dict[k], v)
    assert save_checkpoint(tmp_path / "again.pt", efe, scale_factor=12) == digest
    assert save_checkpoint(tmp_path / "other.pt", trained_efe(1), scale_factor=12) != digest
    # the metadata drives inference: scale factor 1 runs EFE at full resolution
    save_checkpoint(tmp_path / "s1.pt", efe, scale_factor=1, steps=4)
    enhancer = load_model(tmp_path / "s1.pt", device="cpu")
    assert (enhancer.scale_factor, enhancer.steps) == (1, 4)
    images = sice("101_0_.png", (0, 0, 40, 24))
    x = images.float() / 255
    y = x
    with torch.inference_mode():
        r = efe(x)
    for _ in range(4):
        y = y + r * (y * y - y)
    expected = torch.round(255 * y.clamp(0, 1)).int()
    assert (enhancer.enhance(images, **NET).int() - expected).abs().max() <= 1


def test_efe_config_is_stored_and_rebuilds_the_network(tmp_path):
    """The architecture is data in the checkpoint ("arch"), and the network is built from it:
    a non-default width round-trips; files from before EFEConfig (no "level" key, or "level":
    True) and published raw state dicts (no "arch") read as they always did."""
    wide = EFE(features=8, level=True)
    wide.init_weights(generator=torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "wide.pt", wide, scale_factor=12)
    obj = torch.load(tmp_path / "wide.pt", weights_only=True)
    assert obj["arch"] == {"name": "efe", "features": 8, "level": True, "blocks": 7}
    ckpt = load_checkpoint(tmp_path / "wide.pt")
    assert ckpt.efe == EFEConfig(features=8, level=True)
    enhancer = load_model(tmp_path / "wide.pt", backend="eager", device="cpu")
    assert enhancer.efe.e_conv1.point_conv.out_channels == 8
    image = sice("101_0_.png", (0, 0, 96, 72))
    with torch.inference_mode():
        assert torch.equal(
            enhancer.factor_lowres(image),
            wide(
                F.interpolate(
                    image.float() / 255, size=(6, 8), mode="bilinear", align_corners=False
                )
            ),
        )
    # an old file of ours: arch {"name", "blocks", "features"} (+ "level": True with the gain)
    old = dict(obj, arch={"name": "efe", "blocks": 7, "features": 32})
    old["state_dict"] = trained_efe().state_dict()
    old["sha256"] = state_dict_sha256(old["state_dict"])
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").efe == EFEConfig()
    assert load_checkpoint(SGZ_PUBLISHED).efe == EFEConfig()  # inferred from the weights
    published = load_checkpoint(SGZ_PUBLISHED).state_dict
    assert efe_config(None, {**published, "level": torch.zeros(2)}) == EFEConfig(level=True)
    bad = dict(old, arch={"name": "efe", "blocks": 9, "features": 32})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="is not one this build runs"):
        load_checkpoint(tmp_path / "bad.pt")


def test_level_gain_by_hand():
    """EFE(level=True): x_r times exp(a + b * log((mu + 1/255) / 0.5)), clamped; zero = the
    paper's EFE."""
    plain, leveled = trained_efe(), EFE(level=True)
    assert sum(p.numel() for p in leveled.parameters()) == 10_563
    leveled.load_state_dict({**plain.state_dict(), "level": torch.zeros(2)})
    x = torch.rand(2, 3, 9, 11) * 0.4
    x[1] = 0.125  # a flat grey frame: mu = 0.125
    with torch.no_grad():
        base = plain(x)
        assert torch.equal(leveled(x), base)
        leveled.level.copy_(torch.tensor([0.3, -0.5]))
        gain = math.exp(0.3 - 0.5 * math.log((0.125 + 1 / 255) / 0.5))  # 2.6144...
        torch.testing.assert_close(leveled(x)[1], (base[1] * gain).clamp(-1, 1))
        leveled.level.copy_(torch.tensor([20.0, 0.0]))  # a huge gain (e^20) saturates at +-1
        assert leveled(x).abs().max() == 1


def test_level_checkpoints_round_trip_and_every_path_applies_the_gain(tmp_path):
    published = load_checkpoint(SGZ_PUBLISHED).state_dict
    efe = EFE(level=True)
    efe.load_state_dict({**published, "level": torch.tensor([-0.7, -0.25])})
    save_checkpoint(tmp_path / "level.pt", efe, scale_factor=12)
    ckpt = load_checkpoint(tmp_path / "level.pt")
    assert ckpt.level and torch.equal(ckpt.state_dict["level"], efe.level.detach())
    assert not load_checkpoint(SGZ_PUBLISHED).level
    image = sice("101_0_.png")
    eager = load_model(tmp_path / "level.pt", backend="eager", device="cpu")
    want = eager.enhance(image, **NET)
    for backend in ("numba", "torch"):
        got = load_model(tmp_path / "level.pt", backend=backend, device="cpu").enhance(image, **NET)
        assert (got.int() - want.int()).abs().max() <= 1, backend
    # the gain is applied: the same weights without it answer differently
    assert (
        load_model(SGZ_PUBLISHED, device="cpu").enhance(image, **NET).int() - want.int()
    ).abs().max() > 5
    # a checkpoint whose weights and architecture disagree is refused
    obj = torch.load(tmp_path / "level.pt", weights_only=True)
    obj["arch"] = {k: v for k, v in obj["arch"].items() if k != "level"}
    torch.save(obj, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not match its weights"):
        load_checkpoint(tmp_path / "mismatch.pt")


def test_published_checkpoints_load_as_published():
    for path in (SGZ_PUBLISHED, ZERO_DCE_PP_PUBLISHED):
        ckpt = load_checkpoint(path)
        assert (ckpt.source, ckpt.scale_factor, ckpt.steps) == ("published", 12, 8)
    assert load_checkpoint(SGZ_PUBLISHED).sha256 != load_checkpoint(ZERO_DCE_PP_PUBLISHED).sha256


def test_default_checkpoint_is_our_own_trained_one():
    enhancer = load_model(device="cpu")
    ckpt = enhancer.checkpoint
    assert ckpt.source == "sgz-serve" and ckpt.path == str(DEFAULT_CHECKPOINT)
    published = {load_checkpoint(p).sha256 for p in (SGZ_PUBLISHED, ZERO_DCE_PP_PUBLISHED)}
    assert ckpt.sha256 not in published
    assert ckpt.recipe["command"].startswith("sgz train") and ckpt.recipe["steps_done"] > 0
    assert DEFAULT_CHECKPOINT.stat().st_size < 200_000


def test_missing_default_checkpoint_is_a_clear_error(monkeypatch, tmp_path):
    import model.enhancer

    monkeypatch.setattr(model.enhancer, "DEFAULT_CHECKPOINT", tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="default checkpoint .* not in this build"):
        load_model(device="cpu")


class _Marker:
    """Unpickling this would create a file: proof that arbitrary objects were constructed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _saved(tmp_path, name, obj) -> pathlib.Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, trained_efe(), scale_factor=12)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("these are not the weights you are looking for\n" * 20)
    (tmp_path / "empty.pt").write_bytes(b"")
    published = SGZ_PUBLISHED.read_bytes()
    (tmp_path / "published-truncated.pth").write_bytes(published[: len(published) - 5000])

    payload = torch.load(good, weights_only=True)
    payload["state_dict"]["e_conv3.point_conv.bias"] += 0.01  # edited, hash left as it was
    raw = {k: v.clone() for k, v in trained_efe().state_dict().items()}
    bad_shape = dict(raw, **{"e_conv1.depth_conv.weight": torch.zeros(3, 1, 5, 5)})
    nan = dict(raw, **{"e_conv2.point_conv.bias": torch.full((32,), float("nan"))})
    marker = tmp_path / "constructed"
    cases = {
        tmp_path / "missing.pt": "no such file",
        tmp_path / "truncated.pt": "corrupt, truncated",
        tmp_path / "published-truncated.pth": "corrupt, truncated",
        tmp_path / "text.pt": "not a readable PyTorch file",
        tmp_path / "empty.pt": "empty file",
        _saved(tmp_path, "edited.pt", payload): "content hash mismatch",
        _saved(tmp_path, "wrong-keys.pt", {"conv.weight": torch.zeros(3)}): "not an EFE state dict",
        _saved(
            tmp_path, "shape.pt", bad_shape
        ): r"e_conv1.depth_conv.weight has shape \(3, 1, 5, 5\)",
        _saved(tmp_path, "nan.pt", nan): "NaN or inf",
        _saved(tmp_path, "list.pt", [1, 2]): "expected a dict, found list",
        _saved(tmp_path, "object.pt", {"weights": _Marker(marker)}): "refused to unpickle",
        _saved(tmp_path, "version.pt", dict(payload, version=99)): "format version 99",
        _saved(
            tmp_path, "scale.pt", dict(torch.load(good, weights_only=True), scale_factor=0)
        ): "scale_factor must be a positive",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert path.name in str(info.value), "the message must name the file"
    assert not marker.exists(), "an arbitrary pickled object was constructed"
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_model(tmp_path / "edited.pt", device="cpu")


def test_checkpoint_saving_refuses_non_json_recipe(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c.pt", trained_efe(), scale_factor=12, recipe={"f": object()})
    assert not (tmp_path / "c.pt").exists()
