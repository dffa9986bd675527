"""`sgz train` and `sgz eval`."""
import argparse
import sys
from pathlib import Path

LOSS_TERMS = ("spa", "rgb", "bri", "tv", "sem", "uni", "spread", "smooth", "level")  # last 4: ours


def register(sub) -> None:
    from .losses import BRI_FORMS
    from .objective import LEVEL_ON
    from .train import LR_SCHEDULES, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train EFE with the SGZ objective",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=d.data, help="folder of training images")
    p.add_argument("--out", default=d.out, help="run folder: efe.pt, state.pt, log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--crop", type=int, default=d.crop)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="cosine: decay to 0 over the run (--max-steps or --epochs)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--scale-factor", type=int, default=d.scale_factor,
                   help="EFE downscale factor while training (published code: 1)")
    p.add_argument("--infer-scale-factor", type=int, default=d.infer_scale_factor)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="mixed precision (for cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start EFE from this checkpoint (fine-tuning) instead of N(0, 0.02)")
    p.add_argument("--efe-level", action="store_true",
                   help="ours: give EFE a per-image level gain set by the image's mean "
                        "brightness (2 parameters, model/efe.py)")
    p.add_argument("--keep-snapshots", action="store_true",
                   help="also keep OUT/snapshots/efe-STEP.pt at every checkpoint")
    p.add_argument("--loss", choices=["paper", "code"], default="code",
                   help="the paper's loss forms and weights or the published code's")
    for t in LOSS_TERMS:
        p.add_argument(f"--w-{t}", type=float, default=None,
                       help=f"weight of L_{t} (0 switches it off; default: the --loss set's)")
    p.add_argument("--exposure", type=float, default=0.6, help="E of L_bri (Table 3: 0.6)")
    p.add_argument("--level-exposure", type=float, default=None,
                   help="E of L_level, each image's mean luminance (default: --exposure)")
    p.add_argument("--level-on", choices=LEVEL_ON, default="image",
                   help="L_level on Y, or on the input enhanced by x_r's per-image channel means "
                        "(moves only the map's level)")
    p.add_argument("--spa-patch", type=int, default=4, help="pooling of L_spa (Table 3: 4)")
    p.add_argument("--bri-patch", type=int, default=16,
                   help="patch side of L_bri (Eq. 6: 16; the crop size: one exposure per crop)")
    p.add_argument("--bri-form", choices=BRI_FORMS, default=None,
                   help="L_bri's distance to E; l3, log: ours, steeper in the distance (default: l1 "
                        "for --loss paper, l2 for --loss code)")
    p.add_argument("--tv-on", choices=["efe", "full", "image"], default=None,
                   help="what L_tv smooths: x_r at EFE's resolution, x_r upsampled, or Y "
                        "(default: efe for --loss code, image for --loss paper)")
    p.add_argument("--sem-size", type=int, default=128,
                   help="USS sees the enhanced image resized to this longer side (0: full)")
    p.add_argument("--sem-batch", type=int, default=0,
                   help="USS sees only the first K images per batch (0: all)")
    p.add_argument("--uss-backbone", choices=["efficientnet-lite0", "resnet50"],
                   default=d.uss_backbone)
    p.add_argument("--uss-weights", default=None,
                   help="ImageNet weights for resnet50 (torchvision format file)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="score a checkpoint on paired or unpaired folders")
    e.add_argument("--checkpoint", default=None, help="default: the built-in checkpoint")
    e.add_argument("--low", required=True, help="folder of input images")
    e.add_argument("--high", default=None, help="folder of ground truth with the same names")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--no-rows", action="store_true", help="summary only")
    e.add_argument("--save", default=None, help="also write the enhanced images here")
    e.add_argument("--strength", type=float, default=1.0,
                   help="scale the factor map (1 = the model; a diagnostic, as the API's)")
    from model.enhance_cli import add_quality_options
    add_quality_options(e)
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    import torch
    from .train import TrainConfig, train
    if args.threads:
        torch.set_num_threads(args.threads)
    # Trained weights drive some backward values below 1e-38 (dark pixels through the squared
    # RIE steps); x86 handles such denormals ~100x slower. Flushing them to zero halved a
    # scale-1 CPU step started from a trained checkpoint (26 -> 13.5 s) and changes no figure.
    # Set here, for this process, not in train(): callers keep their own float mode.
    torch.set_flush_denormal(True)
    weights = {t: getattr(args, f"w_{t}") for t in LOSS_TERMS if getattr(args, f"w_{t}") is not None}
    objective = {"variant": args.loss, "weights": weights, "exposure": args.exposure,
                 "spa_patch": args.spa_patch, "bri_patch": args.bri_patch,
                 "sem_size": args.sem_size or None,
                 "sem_batch": args.sem_batch or None, "tv_on": args.tv_on,
                 "bri_form": args.bri_form, "level_exposure": args.level_exposure,
                 "level_on": args.level_on}
    cfg = TrainConfig(
        data=args.data, out=args.out, crop=args.crop, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, epochs=args.epochs,
        max_steps=args.max_steps, scale_factor=args.scale_factor,
        infer_scale_factor=args.infer_scale_factor, seed=args.seed, workers=args.workers,
        device=args.device, amp=args.amp, checkpoint_every=args.checkpoint_every,
        keep_snapshots=args.keep_snapshots, init=args.init, efe_level=args.efe_level,
        objective=objective,
        uss_backbone=args.uss_backbone, uss_weights=args.uss_weights)
    try:
        path = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sgz train: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


def run_eval(args) -> int:
    from model import CheckpointError
    from .evaluate import evaluate, format_report
    try:
        report = evaluate(args.checkpoint, Path(args.low), Path(args.high) if args.high else None,
                          device=args.device, save=args.save, strength=args.strength,
                          denoise=args.denoise, exposure=args.exposure)
    except (FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
        print(f"sgz eval: {e}", file=sys.stderr)
        return 2
    if args.no_rows:
        report.pop("rows")
    print(format_report(report, as_json=args.json))
    return 0
