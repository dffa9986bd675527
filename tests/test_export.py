"""`sgz export` (model/export.py): the ONNX graph under ONNX Runtime against the eager reference
on real photos, for our checkpoint and the published one: the default graph (exposure "auto"
and denoising, as `enhance`'s defaults), `--denoise 0 --exposure model` (the network alone) and
a fixed exposure target; the factor-only and float graphs; the onnxruntime backend; bad
checkpoints; the Triton example's config against the exported graph."""

import re

import numpy as np
import pytest
import torch
from conftest import SGZ_PUBLISHED, SICE
from PIL import Image

from model import load_model
from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from model.cli import main
from model.export import export

onnx = pytest.importorskip("onnx", reason="the onnx extra: pip install 'sgz-serve[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra")

DEFAULT = {}  # the default export: enhance's defaults (denoise 1, exposure "auto")
NET = {"denoise": 0, "exposure": None}  # --denoise 0 --exposure model: EFE + level gain + RIE
# crops of a real photo: 1x1, tiny, not multiples of 12, both sides under 18 (1-pixel EFE input)
SIZES = [(1, 1), (13, 7), (2, 300), (25, 37), (301, 457)]
PHOTO, PHOTO_4K = "101_0_.png", "512_0_.png"  # 3840 x 2160
DARK = ["126_0_.png", "450_0_.png"]  # mean input 0.005 and 0.014: auto exposure lifts them


def photo(name: str) -> torch.Tensor:
    with Image.open(SICE / name) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].contiguous()


def crops(image: torch.Tensor):
    for h, w in SIZES:
        yield image[:, :, 50 : 50 + h, 70 : 70 + w].contiguous()


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
def eager_ours():
    return load_model(None, backend="eager", device="cpu")


def cli_export(tmp_path_factory, *flags):
    out = tmp_path_factory.mktemp("export") / "sgz.onnx"
    assert main(["export", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory, eager_ours):
    """Our checkpoint, exported through the CLI with its defaults: (eager reference, session,
    the file, the options the graph equals)."""
    out = cli_export(tmp_path_factory)
    return eager_ours, session(str(out)), out, DEFAULT


@pytest.fixture(scope="module")
def ours_net(tmp_path_factory, eager_ours):
    """`--denoise 0 --exposure model`: the graph before exposure and denoising were in it."""
    out = cli_export(tmp_path_factory, "--denoise", "0", "--exposure", "model")
    return eager_ours, session(str(out)), out, NET


@pytest.fixture(scope="module")
def ours_target(tmp_path_factory, eager_ours):
    out = cli_export(tmp_path_factory, "--exposure", "0.5")
    return eager_ours, session(str(out)), out, {"exposure": 0.5}


@pytest.fixture(scope="module")
def published():
    eager = load_model(SGZ_PUBLISHED, backend="eager", device="cpu")
    return eager, session(export(eager, denoise=0, exposure=None)), None, NET


@pytest.fixture(scope="module")
def published_default():
    eager = load_model(SGZ_PUBLISHED, backend="eager", device="cpu")
    return eager, session(export(eager)), None, DEFAULT


@pytest.mark.parametrize(
    "which", ["ours", "ours_net", "ours_target", "published", "published_default"]
)
def test_graph_matches_eager_on_real_photos(request, which):
    eager, sess, _, options = request.getfixturevalue(which)
    image = photo(PHOTO)
    for crop in [image, *crops(image)]:
        assert_close(run(sess, crop), eager.enhance(crop, **options))
    batch = torch.cat([image[:, :, :200, :300], image[:, :, 300:500, 100:400]])
    assert_close(run(sess, batch), eager.enhance(batch, **options))  # a batch: per-image level


@pytest.mark.parametrize("which", ["ours", "ours_net", "ours_target"])
def test_graph_matches_eager_on_very_dark_photos(request, which):
    """SICE-real's darkest: "auto" lifts them (by at most AUTO_MAX_LIFT), the denoiser smooths
    what the curve amplified; both in the graph, as in `enhance`."""
    eager, sess, _, options = request.getfixturevalue(which)
    denoised = []
    for name in DARK:
        image = photo(name)[:, :, :600, :800].contiguous()
        out = run(sess, image)
        assert_close(out, eager.enhance(image, **options))
        for crop in crops(image):
            assert_close(run(sess, crop), eager.enhance(crop, **options))
        if which == "ours":  # the stages did something here
            net = eager.enhance(image, **NET).numpy()
            assert out.astype(np.float64).mean() > net.astype(np.float64).mean() + 2  # lifted
            denoised.append(not np.array_equal(out, eager.enhance(image, denoise=0).numpy()))
    assert which != "ours" or any(denoised)  # (126 reads no noise: its input is mostly 0)


@pytest.mark.parametrize("which", ["ours", "published"])
def test_graph_matches_eager_at_4k(request, which):
    eager, sess, _, options = request.getfixturevalue(which)
    image = photo(PHOTO_4K)
    assert image.shape[-2:] == (2160, 3840)
    out = run(sess, image)
    assert_close(out, eager.enhance(image, **options))
    assert not np.array_equal(out, image.numpy())  # it did brighten


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_metadata_names_checkpoint_and_contents(ours, ours_net, ours_target):
    eager, _, path, _ = ours
    meta = metadata(path)
    expected = load_checkpoint(DEFAULT_CHECKPOINT).sha256
    assert meta["sgz.checkpoint_sha256"] == eager.sha256 == expected
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", meta["sgz.version"])
    assert (meta["sgz.denoise"], meta["sgz.exposure"]) == ("1", "auto")
    contents = meta["sgz.contents"]
    assert "level gain" in contents and "exposure auto" in contents
    assert "denoise 1" in contents and "enhance(denoise=1, exposure='auto')" in contents
    assert "no denoising" not in contents and "no exposure" not in contents
    assert onnx.load(str(path)).doc_string == contents
    net = metadata(ours_net[2])
    assert (net["sgz.denoise"], net["sgz.exposure"]) == ("0", "model")
    assert "no exposure, no denoising" in net["sgz.contents"]
    target = metadata(ours_target[2])
    assert (target["sgz.denoise"], target["sgz.exposure"]) == ("1", "0.5")
    assert "exposure 0.5" in target["sgz.contents"]
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


def test_factor_only_refuses_stage_options(tmp_path, capsys):
    out = tmp_path / "factor.onnx"
    assert main(["export", str(out), "--factor-only", "--exposure", "0.5"]) == 2
    assert "--factor-only" in capsys.readouterr().err and not out.exists()


def test_float_graph(published):
    eager = published[0]
    sess = session(export(eager, float_io=True, denoise=0, exposure=None))
    image = photo(PHOTO)[:, :, :301, :457].contiguous()
    got = sess.run(None, {"images": image.float().div(255).numpy()})[0]
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
    assert_close(np.round(got * 255).astype(np.uint8), eager.enhance(image, **NET))
    # the default stages too: the denoiser then reads the unrounded RIE output
    sess = session(export(eager, float_io=True))
    got = sess.run(None, {"images": image.float().div(255).numpy()})[0]
    assert_close(np.round(got * 255).astype(np.uint8), eager.enhance(image))


def test_onnxruntime_backend_matches_eager_with_every_option(published):
    eager = published[0]
    ort_model = load_model(SGZ_PUBLISHED, backend="onnxruntime", device="cpu")
    assert ort_model.backend == "onnxruntime"
    image = photo(PHOTO)[:, :, :241, :357]
    for options in ({}, NET, {"denoise": 2.0, "exposure": 0.5}, {"strength": 0.5}):
        assert_close(ort_model.enhance(image, **options).numpy(), eager.enhance(image, **options))
    cl = image.contiguous(memory_format=torch.channels_last)  # as decoded
    assert_close(ort_model.enhance(cl).numpy(), eager.enhance(image))
    with pytest.raises(ValueError, match="CPU only"):
        load_model(
            SGZ_PUBLISHED,
            backend="onnxruntime",
            device="cuda" if torch.cuda.is_available() else "meta",
        )


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
        load_model(bad, backend="onnxruntime", device="cpu")


ONNX_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def pbtxt_tensors(text: str, kind: str) -> list[dict]:
    """The `input [...]` or `output [...]` entries of a Triton config.pbtxt: name, type, dims."""
    block = re.search(rf"^{kind}\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return [
        {
            "name": re.search(r'name:\s*"([^"]+)"', e).group(1),
            "data_type": re.search(r"data_type:\s*(\w+)", e).group(1),
            "dims": [int(d) for d in re.search(r"dims:\s*\[([^\]]*)\]", e).group(1).split(",")],
        }
        for e in re.findall(r"\{(.*?)\}", block, re.S)
    ]


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
