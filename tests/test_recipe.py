"""One source per training config: `sgz train`'s options come from TrainConfig and Objective, and
the default checkpoint's recorded recipe is exactly what `sgz train` writes for the command the
README gives."""

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from conftest import TRAIN

from model import load_checkpoint
from model.checkpoint import DEFAULT_CHECKPOINT
from model.cli import build_parser
from training.cli import config_from_args, train_command
from training.objective import Objective
from training.train import TrainConfig, recipe_of

ROOT = Path(__file__).resolve().parents[1]
MARK = "# the default checkpoint's command"


def parse(command: str) -> TrainConfig:
    """`command` ("sgz train ..." or ".venv/bin/sgz train ...") through the real parser."""
    argv = shlex.split(command)
    assert Path(argv[0]).name == "sgz" and argv[1] == "train", command
    return config_from_args(build_parser().parse_args(argv[1:]))


def readme_command() -> str:
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if MARK in ln]
    assert len(lines) == 1, f"README.md should have one line marked {MARK!r}"
    return lines[0].split("#")[0].strip()


def test_readme_command_gives_the_recorded_recipe():
    recipe = load_checkpoint(DEFAULT_CHECKPOINT).recipe
    assert asdict(parse(readme_command())) == recipe["config"]
    assert parse(recipe["command"]) == parse(readme_command())
    # the model card quotes the same command
    card = (ROOT / "docs" / "model-card.md").read_text()
    quoted = re.search(r"^\| command \| `(sgz train [^`]*)`", card, re.M)
    assert quoted and asdict(parse(quoted.group(1))) == recipe["config"]


def test_recorded_recipe_is_what_sgz_train_writes():
    """No hand-edited fields: the record is recipe_of() for that run's config, steps and
    device, the weights untouched (their hash is the one stored)."""
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    r = ckpt.recipe
    cfg = TrainConfig(**r["config"])
    written = recipe_of(cfg, r["steps_done"], r["wall_time_s"], torch.device(r["device"]))
    assert set(r) == set(written)
    assert r["command"] == train_command(cfg) == written["command"]
    assert r["config"] == written["config"]
    assert re.fullmatch(r"\S+, \d+ CPUs(, .+)?", r["machine"])
    stored = torch.load(DEFAULT_CHECKPOINT, weights_only=True, map_location="cpu")["sha256"]
    assert ckpt.sha256 == stored


def test_cli_defaults_are_the_library_defaults():
    cfg = parse("sgz train")
    assert {k: v for k, v in asdict(cfg).items() if k != "objective"} == {
        k: v for k, v in asdict(TrainConfig()).items() if k != "objective"
    }
    assert Objective(**cfg.objective) == Objective()
    assert cfg.objective["sem_size"] == Objective().sem_size == 128


def test_every_field_round_trips_through_the_command_line():
    """Change every option away from its default: the generated command parses back to it."""
    cfg = TrainConfig(
        data="d ir",
        out="o",
        crop=256,
        batch_size=3,
        lr=3e-4,
        lr_schedule="cosine",
        weight_decay=0.0,
        grad_clip=0.5,
        init_std=0.01,
        epochs=7,
        max_steps=9,
        scale_factor=4,
        infer_scale_factor=8,
        seed=3,
        workers=0,
        device="cpu",
        amp=True,
        checkpoint_every=5,
        keep_snapshots=True,
        init="a.pt",
        efe_level=True,
        uss_backbone="resnet50",
        uss_weights="r.pth",
        objective={
            "variant": "paper",
            "weights": {"spa": 2.0, "level": 0.5},
            "exposure": 0.55,
            "spa_patch": 8,
            "bri_patch": 64,
            "sem_size": 0,
            "sem_batch": 2,
            "tv_on": "full",
            "bri_form": "log",
            "level_exposure": 0.45,
            "level_on": "mean-map",
        },
    )
    changed = {f.name for f in fields(TrainConfig)} - {"objective"}
    assert all(getattr(cfg, k) != getattr(TrainConfig(), k) for k in changed)
    assert parse(train_command(cfg)) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-schedule", "linear"], "invalid choice: 'linear'"),
        (["--sem-size", "big"], "invalid int value: 'big'"),
        (["--loss", "mine"], "invalid choice: 'mine'"),
    ],
)
def test_bad_option_values_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sgz_train_records_the_command_that_reproduces_its_config(tmp_path):
    """A real (one-step) `sgz train` run: its checkpoint's recorded command parses back to its
    recorded config, which is the config its own command line describes."""
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(TRAIN.glob("*.jpg"))[:2]:
        shutil.copy(f, data / f.name)
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--crop",
        "64",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--scale-factor",
        "4",
        "--workers",
        "0",
        "--loss",
        "paper",
        "--w-sem",
        "0",
        "--w-uni",
        "2.5",
        "--bri-form",
        "log",
        "--no-progress",
        "--threads",
        "1",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "model.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    recipe = load_checkpoint(tmp_path / "run" / "efe.pt").recipe
    assert recipe["steps_done"] == 1 and recipe["device"] == "cpu"
    assert asdict(parse(recipe["command"])) == recipe["config"]
    assert parse(recipe["command"]) == config_from_args(build_parser().parse_args(argv))
    assert recipe["config"]["objective"]["weights"] == {"sem": 0.0, "uni": 2.5}
