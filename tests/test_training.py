"""Training: USS is frozen and correct, gradients reach only EFE, a smoke run trains and
resumes into a loadable checkpoint, and `sgz eval` scores real pairs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import LOL, SGZ_PUBLISHED, TRAIN
from PIL import Image

from model import EFE, load_model
from training.objective import Objective
from training.train import TrainConfig, forward, train
from training.uss import USS


@pytest.fixture(scope="module")
def uss():
    return USS("efficientnet-lite0")


def test_backbone_recognises_a_real_cat(uss):
    skimage_data = pytest.importorskip("skimage.data")
    cat = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(cat)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        top = uss.backbone.classify(x).argmax(1).item()
    assert top == 285  # ImageNet class 285: Egyptian cat


def test_uss_shapes_and_frozen_mode(uss):
    uss.train()  # must not unfreeze batch norm
    assert not uss.training
    assert not any(p.requires_grad for p in uss.parameters())
    assert uss(torch.rand(1, 3, 64, 96)).shape == (1, 21, 16, 24)


@pytest.mark.parametrize("level", [False, True], ids=["efe", "efe-level"])
def test_gradients_reach_efe_and_uss_does_not_change(uss, level):
    efe = EFE(level=level)
    efe.init_weights(generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in uss.state_dict().items()}
    opt = torch.optim.Adam(efe.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 64, 64) * 0.3
    y, x_r, x_r_efe = forward(efe, x, scale_factor=4)
    assert x_r_efe.shape == (2, 3, 16, 16) and x_r.shape == (2, 3, 64, 64)
    loss, terms = Objective(variant="code")(y, x, x_r, uss, x_r_efe)
    opt.zero_grad()
    loss.backward()
    assert set(terms) == {"spa", "rgb", "bri", "tv", "sem"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in efe.parameters())
    assert all(p.grad is None for p in uss.parameters())
    opt.step()
    after = uss.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers


def test_resnet50_without_weights_says_where_to_get_them():
    with pytest.raises(FileNotFoundError, match="--uss-weights"):
        USS("resnet50", None)


def train_images(tmp_path, n: int):
    """The first n training images in a folder of their own."""
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(TRAIN.glob("*.jpg"))[:n]:
        shutil.copy(f, data / f.name)
    return data


def test_smoke_train_resume_and_load(tmp_path):
    data = train_images(tmp_path, 4)
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        crop=64,
        batch_size=2,
        max_steps=2,
        workers=0,
        checkpoint_every=1,
        scale_factor=4,
        keep_snapshots=True,
        objective={"sem_size": 64},
    )
    path = train(cfg, progress=False)
    enhancer = load_model(path, device="cpu")
    assert enhancer.checkpoint.recipe["steps_done"] == 2
    cfg.max_steps = 3
    train(cfg, resume=True, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"spa", "rgb", "bri", "tv", "sem"} <= set(log[-1])
    out = load_model(path, device="cpu").enhance(torch.full((1, 3, 30, 20), 40, dtype=torch.uint8))
    assert out.shape == (1, 3, 30, 20)
    snapshots = sorted((tmp_path / "run" / "snapshots").glob("*.pt"))
    assert [p.name for p in snapshots] == [f"efe-00000{i}.pt" for i in (1, 2, 3)]
    assert load_model(snapshots[0], device="cpu").checkpoint.recipe["steps_done"] == 1
    assert load_model(snapshots[-1]).sha256 == load_model(path).sha256


def test_init_from_a_checkpoint_and_bad_init(tmp_path):
    """--init starts from given weights: with lr 0 and no decay they come out unchanged."""
    data = train_images(tmp_path, 2)
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        crop=64,
        batch_size=2,
        max_steps=1,
        workers=0,
        lr=0.0,
        weight_decay=0.0,
        init=str(SGZ_PUBLISHED),
        objective={"sem_size": 64},
    )
    path = train(cfg, progress=False)
    assert load_model(path, device="cpu").sha256 == load_model(SGZ_PUBLISHED, device="cpu").sha256
    # with our level gain on top, a published start keeps its weights and the gain is identity
    cfg.out, cfg.efe_level = str(tmp_path / "level"), True
    leveled = load_model(train(cfg, progress=False), backend="eager", device="cpu")
    assert leveled.checkpoint.level and torch.equal(leveled.efe.level, torch.zeros(2))
    image = torch.from_numpy(np.asarray(Image.open(sorted((LOL / "low").glob("*.png"))[0])))
    image = image.permute(2, 0, 1)[None].contiguous()
    published = load_model(SGZ_PUBLISHED, backend="eager", device="cpu")
    assert torch.equal(leveled.enhance(image), published.enhance(image))
    cfg.init, cfg.efe_level = str(tmp_path / "level" / "efe.pt"), False
    with pytest.raises(ValueError, match="--efe-level"):
        train(cfg, progress=False)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.cli",
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "bad"),
            "--init",
            str(tmp_path / "missing.pt"),
            "--max-steps",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "missing.pt" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_smoke_train_on_cuda(tmp_path, amp):
    """The defaults (scale 12, EfficientNet-Lite0 USS) on the GPU, with and without bf16."""
    data = train_images(tmp_path, 6)
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), max_steps=3, workers=2, device="cuda", amp=amp
    )
    path = train(cfg, progress=False)
    enhancer = load_model(path, device="cuda")
    assert enhancer.checkpoint.recipe["device"].startswith("cuda")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log)


def test_sgz_eval_paired_json(tmp_path):
    pytest.importorskip("pypiqe")
    low, high = tmp_path / "low", tmp_path / "high"
    low.mkdir(), high.mkdir()
    for f in sorted((LOL / "low").glob("*.png"))[:3]:
        shutil.copy(f, low / f.name)
        shutil.copy(LOL / "high" / f.name, high / f.name)

    def sgz_eval(*extra: str) -> dict:
        args = ["--checkpoint", str(SGZ_PUBLISHED), "--low", str(low), "--high", str(high)]
        r = subprocess.run(
            [sys.executable, "-m", "training", "eval", *args, "--json", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    report = sgz_eval()
    assert report["images"] == 3
    s = report["summary"]
    assert 10 < s["psnr"] < 30 and 0 < s["ssim"] < 1 and s["gt_mean_psnr"] > s["psnr"]
    # the per-channel oracle can only remove more error than the global scale
    assert all(row["channel_gt_mean_psnr"] > row["gt_mean_psnr"] - 0.5 for row in report["rows"])
    weaker = sgz_eval("--strength", "0.5")
    assert weaker["strength"] == 0.5
    assert weaker["summary"]["brightness"] < s["brightness"]


def test_sgz_eval_unpaired_and_bad_checkpoint(tmp_path):
    pytest.importorskip("pypiqe")
    low = tmp_path / "low"
    low.mkdir()
    shutil.copy(sorted((LOL / "low").glob("*.png"))[0], low / "a.png")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "eval",
            "--checkpoint",
            str(SGZ_PUBLISHED),
            "--low",
            str(low),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "piqe" in json.loads(r.stdout)["summary"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run(
        [sys.executable, "-m", "training", "eval", "--checkpoint", str(bad), "--low", str(low)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "bad.pt" in r.stderr and "Traceback" not in r.stderr


def test_cosine_schedule_decays_to_zero_and_resumes(tmp_path):
    data = train_images(tmp_path, 2)
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        crop=64,
        batch_size=2,
        max_steps=2,
        workers=0,
        lr=1e-3,
        lr_schedule="cosine",
        scale_factor=4,
        checkpoint_every=1,
        objective={"sem_size": 64, "weights": {"sem": 0}},
    )
    train(cfg, progress=False)
    cfg.max_steps = 4  # resumed with a longer run: the schedule follows the new total
    train(cfg, resume=True, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # steps 1-2 ran as a 2-step run (1e-3, 5e-4); steps 3-4 as steps 2-3 of a 4-step run
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 5e-4, 5e-4, 1e-3 * (1 - 0.5**0.5) / 2])
    with pytest.raises(ValueError, match="lr_schedule"):
        train(TrainConfig(data=str(data), lr_schedule="linear"), progress=False)
