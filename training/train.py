"""`sgz train`: optimise EFE with the SGZ objective on a folder of unpaired images."""
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model import EFE, load_checkpoint, save_checkpoint
from model.rie import STEPS, downscale, rie, upsample_factor

from .data import CropDataset, make_loader
from .objective import Objective


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    data: str = "../shared/data/train"
    out: str = "runs/sgz"
    crop: int = 512                 # paper: 512x512 training images
    batch_size: int = 6             # paper Sec. 4.1
    lr: float = 1e-4                # paper Sec. 4.1 (Adam)
    lr_schedule: str = "constant"   # or "cosine": lr * (1 + cos(pi * step / total)) / 2
    weight_decay: float = 1e-4      # published code
    grad_clip: float = 0.1          # paper Sec. 4.1: gradient-norm clip 0.1
    init_std: float = 0.02          # paper Sec. 4.1: EFE init N(0, 0.02)
    epochs: int = 100               # paper Sec. 4.1
    max_steps: int | None = None
    scale_factor: int = 12          # EFE downscale while training (published code: 1)
    infer_scale_factor: int = 12    # written into the checkpoint for inference
    seed: int = 0
    workers: int = 2
    device: str | None = None
    amp: bool = False
    checkpoint_every: int = 100
    keep_snapshots: bool = False    # also keep OUT/snapshots/efe-STEP.pt at every checkpoint
    init: str | None = None         # start EFE from this checkpoint instead of N(0, init_std)
    efe_level: bool = False         # ours: EFE's per-image level gain (model/efe.py)
    objective: dict = field(default_factory=dict)  # Objective(**objective)
    uss_backbone: str = "efficientnet-lite0"
    uss_weights: str | None = None


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
    # channels-last: oneDNN's depthwise convolutions (forward and backward) ran ~3x faster on
    # NHWC maps (a scale-1 step of 6 crops of 512 px: 15-20 s -> 6 s on 2 cores), cuDNN's too
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
            log.write(json.dumps({"step": step, "epoch": epoch, "loss": float(loss.detach()),
                                  "lr": lr, **terms,
                                  "time_s": round(time.perf_counter() - t0, 2)}) + "\n")
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


def _save(out: Path, cfg: TrainConfig, efe, opt, step: int, elapsed: float, device) -> None:
    tmp = out / "state.pt.tmp"
    torch.save({"efe": efe.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "elapsed_s": elapsed}, tmp)
    tmp.replace(out / "state.pt")
    recipe = {"config": asdict(cfg), "steps_done": step, "wall_time_s": round(elapsed, 1),
              "device": str(device), "machine": f"{platform.machine()} {platform.processor()}",
              "torch": torch.__version__}
    save_checkpoint(out / "efe.pt", efe, cfg.infer_scale_factor, STEPS, recipe)
    if cfg.keep_snapshots:  # for choosing a step afterwards (the model card's ablations)
        (out / "snapshots").mkdir(exist_ok=True)
        save_checkpoint(out / "snapshots" / f"efe-{step:06d}.pt", efe, cfg.infer_scale_factor,
                        STEPS, recipe)
