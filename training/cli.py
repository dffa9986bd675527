"""`sgz train` and `sgz eval`. `sgz train`'s options are generated from TrainConfig and
Objective (training/options.py): their fields hold every default and help text."""

import argparse
import sys
from dataclasses import asdict, fields
from pathlib import Path

from .options import HelpFormatter, add_options, format_value, from_args, to_args


def loss_terms() -> tuple[str, ...]:
    from .objective import DEFAULT_WEIGHTS

    return tuple(DEFAULT_WEIGHTS["code"])


def register(sub) -> None:
    from .objective import Objective
    from .train import TrainConfig

    p = sub.add_parser(
        "train", help="train EFE with the SGZ objective", formatter_class=HelpFormatter
    )
    add_options(p, TrainConfig)
    add_options(p, Objective)
    for t in loss_terms():
        p.add_argument(
            f"--w-{t}",
            type=float,
            default=None,
            help=f"weight of L_{t} (0 switches it off; default: the --loss set's)",
        )
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    e.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="scale the factor map (1 = the model; a diagnostic, as the API's)",
    )
    from model.enhance_cli import add_quality_options

    add_quality_options(e)
    e.set_defaults(func=run_eval)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig that parsed `sgz train` options describe."""
    from .objective import Objective
    from .train import TrainConfig

    given = from_args(Objective, args)
    weights = {
        t: getattr(args, f"w_{t}") for t in loss_terms() if getattr(args, f"w_{t}") is not None
    }
    objective = {
        f.name: weights if f.name == "weights" else given[f.name] for f in fields(Objective)
    }
    return TrainConfig(**from_args(TrainConfig, args), objective=objective)


def train_command(cfg) -> str:
    """The `sgz train` command line whose options give `cfg` (defaults left out)."""
    from .objective import Objective
    from .train import TrainConfig

    objective = dict(cfg.objective)
    argv = ["sgz", "train", *to_args(TrainConfig, asdict(cfg)), *to_args(Objective, objective)]
    for t, w in (objective.get("weights") or {}).items():
        argv += [f"--w-{t}", format_value(w)]
    return " ".join(argv)


def run_train(args) -> int:
    import torch

    from .train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    # x86 handles the denormal floats that trained weights drive some backward values to far
    # slower; flushing them changes no figure (docs/training.md, "Training speed"). Set here,
    # for this process, not in train(): callers keep their own float mode.
    torch.set_flush_denormal(True)
    try:
        path = train(config_from_args(args), resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sgz train: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


def run_eval(args) -> int:
    from model import CheckpointError

    from .evaluate import evaluate, format_report

    try:
        report = evaluate(
            args.checkpoint,
            Path(args.low),
            Path(args.high) if args.high else None,
            device=args.device,
            save=args.save,
            strength=args.strength,
            denoise=args.denoise,
            exposure=args.exposure,
        )
    except (FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
        print(f"sgz eval: {e}", file=sys.stderr)
        return 2
    if args.no_rows:
        report.pop("rows")
    print(format_report(report, as_json=args.json))
    return 0
