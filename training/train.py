"""`sgz train`: optimise EFE with the SGZ objective on a folder of unpaired images."""

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import EFE, load_checkpoint, save_checkpoint
from model.rie import STEPS, downscale, rie, upsample_factor

from .cli import train_command
from .data import CropDataset, make_loader
from .objective import Objective
from .options import option

LR_SCHEDULES = ("constant", "cosine")
USS_BACKBONES = ("efficientnet-lite0", "resnet50")


@dataclass
class TrainConfig:
    """Everything a run depends on; `sgz train` has one option per field (training/options.py)
    and writes this, as given, into the checkpoint's recipe."""

    data: str = option("../shared/data/train", "folder of training images")
    out: str = option("runs/sgz", "run folder: efe.pt, state.pt, log.jsonl")
    crop: int = option(512, "side of the random square training crops (paper: 512)")
    batch_size: int = option(6, "crops per step (paper Sec. 4.1: 6)")
    lr: float = option(1e-4, "Adam learning rate (paper Sec. 4.1: 1e-4)")
    lr_schedule: str = option(
        "constant",
        "cosine: lr * (1 + cos(pi * step / total)) / 2, "
        "decaying to 0 over the run (--max-steps or --epochs)",
        choices=LR_SCHEDULES,
    )
    weight_decay: float = option(1e-4, "Adam weight decay (published code: 1e-4)")
    grad_clip: float = option(0.1, "gradient-norm clip (paper Sec. 4.1: 0.1)")
    init_std: float = option(0.02, "std of EFE's normal init (paper Sec. 4.1: 0.02)")
    epochs: int = option(100, "passes over the data (paper Sec. 4.1: 100)")
    max_steps: int | None = option(None, "stop after this many steps (default: --epochs)")
    scale_factor: int = option(12, "EFE downscale factor while training (published code: 1)")
    infer_scale_factor: int = option(
        12, "EFE downscale factor written into the checkpoint for inference"
    )
    seed: int = option(0, "seed of the init, the crops and their order")
    workers: int = option(2, "data loader processes")
    device: str | None = option(None, "cpu or cuda (default: cuda if available)")
    amp: bool = option(False, "bf16 mixed precision (for cuda)")
    checkpoint_every: int = option(100, "write efe.pt and state.pt every N steps")
    keep_snapshots: bool = option(False, "also keep OUT/snapshots/efe-STEP.pt at every checkpoint")
    init: str | None = option(
        None,
        "start EFE from this checkpoint (fine-tuning) instead of N(0, --init-std)",
        metavar="CHECKPOINT",
    )
    efe_level: bool = option(
        False,
        "ours: give EFE a per-image level gain set by the image's "
        "mean brightness (2 parameters, model/efe.py)",
    )
    objective: dict = option(
        help="Objective(**objective); its own options", default_factory=dict, cli=False
    )
    uss_backbone: str = option(
        "efficientnet-lite0", "USS's ImageNet backbone", choices=USS_BACKBONES
    )
    uss_weights: str | None = option(
        None, "ImageNet weights for resnet50 (torchvision format file)"
    )


def forward(efe: EFE, x: torch.Tensor, scale_factor: int):
    """EFE on the downscaled image, x_r upsampled to full size, then RIE (Eq. 1).
    Returns the enhanced image, x_r at full size and x_r at EFE's resolution."""
    x_r_efe = efe(downscale(x, scale_factor))
    x_r = upsample_factor(x_r_efe, tuple(x.shape[-2:]))
    return rie(x, x_r, STEPS), x_r, x_r_efe


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    objective = Objective(**cfg.objective)
    uss = None
    if objective.weights["sem"]:
        from .uss import USS

        uss = USS(cfg.uss_backbone, cfg.uss_weights).to(device)
    # initialised on the CPU: the same seed gives the same start on every device
    efe = EFE(level=cfg.efe_level)
    efe.init_weights(cfg.init_std, torch.Generator().manual_seed(cfg.seed))
    if cfg.init:
        init = load_checkpoint(cfg.init).state_dict
        if cfg.efe_level and "level" not in init:  # a level-less start: the gain at identity
            init = {**init, "level": efe.level.detach().clone()}
        if "level" in init and not cfg.efe_level:
            raise ValueError(f"--init {cfg.init} has the level gain: train it with --efe-level")
        efe.load_state_dict(init)
    # channels-last: oneDNN's and cuDNN's depthwise convolutions are faster on NHWC maps
    # (docs/training.md, "Training speed")
    efe.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(efe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = CropDataset(cfg.data, cfg.crop, cfg.seed)
    per_epoch = len(dataset) // cfg.batch_size
    total = cfg.max_steps or cfg.epochs * per_epoch
    step, elapsed = 0, 0.0
    state_path = out / "state.pt"
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        efe.load_state_dict(state["efe"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        _truncate_log(out / "log.jsonl", step)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=total, initial=step, disable=not progress, dynamic_ncols=True, unit="step")
    t0 = time.perf_counter() - elapsed
    efe.train()
    while step < total:
        epoch, start = divmod(step, per_epoch)
        for x in make_loader(dataset, cfg.batch_size, cfg.workers, cfg.seed, epoch, start):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            # bf16 autocast: the range of fp32, so no gradient scaler is needed
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                y, x_r, x_r_efe = forward(efe, x, cfg.scale_factor)
                loss, terms = objective(y.float(), x, x_r.float(), uss, x_r_efe.float())
            lr = _lr(cfg, step, total)
            for group in opt.param_groups:  # from the step alone: a resumed run needs no state
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(efe.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"loss became {float(loss)} at step {step}")
            log.write(
                json.dumps(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": float(loss.detach()),
                        "lr": lr,
                        **terms,
                        "time_s": round(time.perf_counter() - t0, 2),
                    }
                )
                + "\n"
            )
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
            if step % cfg.checkpoint_every == 0 or step == total:
                log.flush()
                _save(out, cfg, efe, opt, step, time.perf_counter() - t0, device)
            if step >= total:
                break
    bar.close()
    log.close()
    return out / "efe.pt"


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for the update after `step` updates (cosine: towards 0 at the last step, so
    the last snapshot is the run's result rather than a stopping point picked on a test set)."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return cfg.lr


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step: they were computed after the last checkpoint."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def recipe_of(cfg: TrainConfig, step: int, elapsed: float, device) -> dict:
    """What a checkpoint records of its run: the only writer of `Checkpoint.recipe`."""
    return {
        "config": asdict(cfg),
        "command": train_command(cfg),
        "steps_done": step,
        "wall_time_s": round(elapsed, 1),
        "device": str(device),
        "machine": _machine(device),
        "torch": torch.__version__,
    }


def _machine(device) -> str:
    """e.g. "x86_64, 2 CPUs" or "x86_64, 16 CPUs, NVIDIA H200": what the wall time was on."""
    parts = [platform.machine(), f"{os.cpu_count()} CPUs"]
    if torch.device(device).type == "cuda":
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)


def _save(out: Path, cfg: TrainConfig, efe, opt, step: int, elapsed: float, device) -> None:
    tmp = out / "state.pt.tmp"
    torch.save(
        {
            "efe": efe.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
        },
        tmp,
    )
    tmp.replace(out / "state.pt")
    recipe = recipe_of(cfg, step, elapsed, device)
    save_checkpoint(out / "efe.pt", efe, cfg.infer_scale_factor, STEPS, recipe)
    if cfg.keep_snapshots:  # for choosing a step afterwards (docs/experiments/training-runs.md)
        (out / "snapshots").mkdir(exist_ok=True)
        save_checkpoint(
            out / "snapshots" / f"efe-{step:06d}.pt", efe, cfg.infer_scale_factor, STEPS, recipe
        )
