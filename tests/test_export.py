"""`sgz export` (model/export.py): the ONNX graph under ONNX Runtime against the eager reference
on real photos, for our checkpoint and the published one; the factor-only and float graphs; the
onnxruntime backend; bad checkpoints; the Triton example's config against the exported graph."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SGZ_PUBLISHED, SICE
from model import load_model
from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from model.cli import main
from model.export import export

onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install 'sgz-serve[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra")

NET = {"denoise": 0, "exposure": None}  # what the graph contains: EFE + level gain + RIE
# crops of a real photo: 1x1, tiny, not multiples of 12, both sides under 18 (1-pixel EFE input)
SIZES = [(1, 1), (13, 7), (2, 300), (25, 37), (301, 457)]
PHOTO, PHOTO_4K = "101_0_.png", "512_0_.png"  # 3840 x 2160


def photo(name: str) -> torch.Tensor:
    with Image.open(SICE / name) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].contiguous()


def crops(image: torch.Tensor):
    for h, w in SIZES:
        yield image[:, :, 50:50 + h, 70:70 + w].contiguous()


def session(model: bytes | str):
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def run(sess, images) -> np.ndarray:
    return sess.run(None, {"images": np.ascontiguousarray(images.numpy())})[0]


def assert_close(got: np.ndarray, want: torch.Tensor, share: float = 0.01) -> None:
    assert got.dtype == np.uint8 and got.shape == tuple(want.shape)
    diff = np.abs(got.astype(np.int16) - want.numpy().astype(np.int16))
    assert diff.max() <= 1, f"{diff.max()} grey levels apart"
    # ORT's mean/exp/log put the level gain's x_r ~1e-5 off torch's (4K, ours: 0.3% of pixels
    # flip a rounding); a real difference in the graph would shift far more
    assert (diff > 0).mean() < share


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our checkpoint, exported through the CLI: (eager reference, session, the file)."""
    out = tmp_path_factory.mktemp("export") / "sgz.onnx"
    assert main(["export", str(out)]) == 0
    return load_model(None, "cpu", fast=False), session(str(out)), out


@pytest.fixture(scope="module")
def published():
    eager = load_model(SGZ_PUBLISHED, "cpu", fast=False)
    return eager, session(export(eager))


@pytest.mark.parametrize("which", ["ours", "published"])
def test_graph_matches_eager_on_real_photos(request, which):
    eager, sess = request.getfixturevalue(which)[:2]
    image = photo(PHOTO)
    for crop in [image, *crops(image)]:
        assert_close(run(sess, crop), eager.enhance(crop, **NET))
    batch = torch.cat([image[:, :, :200, :300], image[:, :, 300:500, 100:400]])
    assert_close(run(sess, batch), eager.enhance(batch, **NET))  # a batch: per-image level


@pytest.mark.parametrize("which", ["ours", "published"])
def test_graph_matches_eager_at_4k(request, which):
    eager, sess = request.getfixturevalue(which)[:2]
    image = photo(PHOTO_4K)
    assert image.shape[-2:] == (2160, 3840)
    out = run(sess, image)
    assert_close(out, eager.enhance(image, **NET))
    assert not np.array_equal(out, image.numpy())  # it did brighten


def test_metadata_names_checkpoint_and_contents(ours):
    eager, _, path = ours
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["sgz.checkpoint_sha256"] == eager.sha256 == load_checkpoint(DEFAULT_CHECKPOINT).sha256
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", meta["sgz.version"])
    assert "level gain" in meta["sgz.contents"] and "no denoising" in meta["sgz.contents"]
    graph = onnx.load(str(path)).graph
    (inp,), (outp,) = graph.input, graph.output
    assert (inp.name, outp.name) == ("images", "enhanced")
    for value in (inp, outp):  # uint8, dynamic batch, height and width
        t = value.type.tensor_type
        assert t.elem_type == onnx.TensorProto.UINT8
        assert [d.dim_param or d.dim_value for d in t.shape.dim] == ["batch", 3, "height", "width"]


def test_factor_only_matches_factor(tmp_path, ours):
    eager = ours[0]
    out = tmp_path / "factor.onnx"
    assert main(["export", str(out), "--factor-only", "--checkpoint", str(DEFAULT_CHECKPOINT)]) == 0
    sess = session(str(out))
    assert sess.get_outputs()[0].name == "factor"
    for crop in crops(photo(PHOTO)):
        np.testing.assert_allclose(run(sess, crop), eager.factor(crop).numpy(), atol=1e-4, rtol=0)


def test_float_graph(published):
    eager = published[0]
    sess = session(export(eager, float_io=True))
    image = photo(PHOTO)[:, :, :301, :457].contiguous()
    got = sess.run(None, {"images": image.float().div(255).numpy()})[0]
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
    assert_close(np.round(got * 255).astype(np.uint8), eager.enhance(image, **NET))


def test_onnxruntime_backend_matches_eager_with_every_option(published):
    eager = published[0]
    ort_model = load_model(SGZ_PUBLISHED, "cpu", backend="onnxruntime")
    assert ort_model.backend == "onnxruntime"
    image = photo(PHOTO)[:, :, :241, :357]
    for options in ({}, NET, {"denoise": 2.0, "exposure": 0.5}, {"strength": 0.5}):
        assert_close(ort_model.enhance(image, **options).numpy(), eager.enhance(image, **options))
    cl = image.contiguous(memory_format=torch.channels_last)  # as decoded
    assert_close(ort_model.enhance(cl).numpy(), eager.enhance(image))
    with pytest.raises(ValueError, match="CPU only"):
        load_model(SGZ_PUBLISHED, "cuda" if torch.cuda.is_available() else "meta",
                   backend="onnxruntime")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_bad_checkpoint_same_clear_error(tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError) as expected:
        load_checkpoint(bad)
    assert main(["export", str(tmp_path / "x.onnx"), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"sgz export: error: {expected.value}\n"  # one line, as `sgz enhance` says it
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(CheckpointError, match=re.escape(str(expected.value))):
        load_model(bad, "cpu", backend="onnxruntime")


ONNX_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def pbtxt_tensors(text: str, kind: str) -> list[dict]:
    """The `input [...]` or `output [...]` entries of a Triton config.pbtxt: name, type, dims."""
    block = re.search(rf"^{kind}\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return [{"name": re.search(r'name:\s*"([^"]+)"', e).group(1),
             "data_type": re.search(r"data_type:\s*(\w+)", e).group(1),
             "dims": [int(d) for d in re.search(r"dims:\s*\[([^\]]*)\]", e).group(1).split(",")]}
            for e in re.findall(r"\{(.*?)\}", block, re.S)]


def test_triton_config_matches_exported_graph(ours):
    """deploy/triton/sgz/config.pbtxt names, types and shapes the default export's tensors
    (Triton prepends the batch dimension when max_batch_size > 0)."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1] / "deploy" / "triton"
    text = (repo / "sgz" / "config.pbtxt").read_text()
    assert re.search(r'^name:\s*"sgz"', text, re.M)
    assert re.search(r'^backend:\s*"onnxruntime"', text, re.M)
    assert int(re.search(r"^max_batch_size:\s*(\d+)", text, re.M).group(1)) > 0
    assert re.search(r"^dynamic_batching\s*\{", text, re.M)
    graph = onnx.load(str(ours[2])).graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        want = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.dim_value else -1 for d in t.shape.dim]
            assert dims[0] == -1  # the batch: Triton's
            want.append({"name": v.name, "data_type": ONNX_TYPES[t.elem_type], "dims": dims[1:]})
        assert pbtxt_tensors(text, kind) == want
    assert (repo / "README.md").is_file()


def test_opset_out_of_range_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path / "x.onnx"), "--opset", "99"])
    assert exit_.value.code == 2 and "11-20" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
