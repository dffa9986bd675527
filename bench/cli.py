"""`sgz bench`: the model-step benchmark (part 1), the HTTP benchmark with server memory
(parts 2 and 3) and the video benchmark (part 5). Prints tables, and with --out writes
everything as JSON.

Every comparison is made within one run on one machine: absolute numbers move with the machine
and its load, the ratios are the result.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .tables import PATHS, http_table, model_table, video_table

SIZES = "600x400,1200x900,1920x1080,3840x2160"
VIDEO_SIZES = "1280x720,1920x1080"
PARTS = ("model", "http", "video")
HTTP_CASES = "jpeg:1200x900,png:1200x900,jpeg:1920x1080,png:1920x1080"
DEFAULT_PATHS = "fast,denoise,eager,published"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the model step and the HTTP service against baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="checkpoint to run (default: the built-in checkpoint)")
    p.add_argument(
        "--shared",
        default=os.environ.get("SGZ_SHARED", "../shared"),
        help="the shared folder with data/sice-real (default: $SGZ_SHARED or ../shared)",
    )
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument(
        "--parts",
        default="model,http",
        help="a list of model, http, video (default model,http: video takes minutes)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the model runs, in every path and server (default cpu)",
    )
    g = p.add_argument_group("model step")
    g.add_argument("--sizes", default=SIZES, help=f"WxH list (default {SIZES})")
    g.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    g.add_argument(
        "--paths",
        default=DEFAULT_PATHS,
        help=f"some of {', '.join(PATHS)} (default {DEFAULT_PATHS})",
    )
    g.add_argument("--repeats", type=int, default=20, help="timed calls per path and cell")
    g.add_argument(
        "--cell-budget",
        type=float,
        default=60.0,
        help="seconds per cell after which repeats stop (at least 3 are made)",
    )
    p.add_argument("--threads", type=int, help="torch (and fast path) threads; default: torch's")
    g = p.add_argument_group("HTTP")
    g.add_argument(
        "--servers",
        default="sgz,naive,litserve",
        help="sgz, naive, litserve, sgz-cpujpeg (ours with SGZ_JPEG_CODEC=cpu), sgz-gpubatch "
        "(ours with SGZ_JPEG_GPU_BATCH=32), sgz@REV: "
        "our service at git revision REV (a before/after comparison in the same run); "
        "KIND*N: N processes of it, the load shared between them",
    )
    g.add_argument("--concurrency", default="1,8,32,64")
    g.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="load client processes sharing each concurrency level (a GPU host: one per few "
        "cores; one Python client tops out near a thousand requests a second)",
    )
    g.add_argument(
        "--duration", type=float, default=6.0, help="seconds of load per server, level and round"
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds; figures are medians over them (default 3)",
    )
    g.add_argument(
        "--query",
        default="",
        help="enhance options for every request, as /enhance's query string, e.g. "
        "'denoise=0&exposure=model' (the network alone); the baselines are "
        "started doing the same work (default: enhance's defaults)",
    )
    g.add_argument(
        "--cases",
        default=HTTP_CASES,
        help="FORMAT:PHOTOS list: jpeg or png (sent and answered), photos at WxH or "
        "the shared ones as they are: small (512x512), mixed (up to "
        f"1920x1080), all (default {HTTP_CASES})",
    )
    g = p.add_argument_group("video")
    g.add_argument("--video-sizes", default=VIDEO_SIZES, help=f"WxH list (default {VIDEO_SIZES})")
    g.add_argument("--video-frames", type=int, default=96, help="frames per clip (default 96)")
    g.add_argument(
        "--video-rounds",
        type=int,
        default=3,
        help="runs of each path, alternating; figures are medians (default 3)",
    )
    p.set_defaults(func=bench)


def _list(text: str, conv=str) -> list:
    return [conv(v) for v in text.split(",") if v.strip()]


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def bench(args: argparse.Namespace) -> int:
    from model import DEFAULT_CHECKPOINT

    from .http_cases import enhance_kwargs, parse_cases
    from .servers import SERVERS

    default = str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_file() else None
    checkpoint = args.checkpoint or default
    if checkpoint is None or not Path(checkpoint).is_file():
        print(
            f"sgz bench: checkpoint {checkpoint or DEFAULT_CHECKPOINT} not found; "
            "pass --checkpoint PATH",
            file=sys.stderr,
        )
        return 2
    shared = Path(args.shared)
    if not (shared / "data" / "sice-real").is_dir():
        print(f"sgz bench: no photos at {shared}/data/sice-real; pass --shared", file=sys.stderr)
        return 2
    parts = set(_list(args.parts))
    try:
        sizes, batches = _list(args.sizes, _size), _list(args.batches, int)
        paths, levels = _list(args.paths), _list(args.concurrency, int)
        video_sizes = _list(args.video_sizes, _size)
        cases = parse_cases(args.cases)
        enhance_kwargs(args.query)
    except ValueError as e:
        print(f"sgz bench: bad argument: {e}", file=sys.stderr)
        return 2
    servers = {s.partition("@")[0].partition("*")[0] for s in _list(args.servers)}
    unknown = (parts - set(PARTS)) | (set(paths) - set(PATHS)) | (servers - set(SERVERS))
    if unknown:
        print(f"sgz bench: unknown part, path or server {sorted(unknown)}", file=sys.stderr)
        return 2
    if "video" in parts and any(w % 2 or h % 2 for w, h in video_sizes):
        print("sgz bench: --video-sizes must be even (H.264 in yuv420p)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sgz bench: --device cuda, but PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": checkpoint,
        "machine": machine(args.device),
        "device": args.device,
        "command": "sgz bench " + " ".join(sys.argv[2:]),
    }
    m = results["machine"]
    gpu = f", GPU {m['gpu']} (the model runs there)" if "gpu" in m else ""
    print(
        f"machine: {m['cores']} cores{gpu}, torch {m['torch']} "
        f"with {m['torch_threads']} threads, "
        f"load average {m['load_avg_1m']:.1f} at start (other processes share the cores: "
        "compare the ratios, which are measured side by side)",
        flush=True,
    )
    if "model" in parts:
        from .model_bench import run_model_bench

        print(f"model step: {', '.join(paths)} (median of {args.repeats} calls each)", flush=True)
        results["model"] = run_model_bench(
            checkpoint,
            shared,
            sizes,
            batches,
            paths,
            args.repeats,
            args.cell_budget,
            log=lambda s: print(s, flush=True),
            device=args.device,
        )
        print(model_table(results["model"]))
    if "http" in parts:
        from .http_bench import run_http_bench

        print(
            f"HTTP: {args.servers}, {args.rounds} interleaved rounds of {args.duration:g} s "
            "per server and level",
            flush=True,
        )
        results["http"] = run_http_bench(
            checkpoint,
            shared,
            _list(args.servers),
            levels,
            args.duration,
            cases,
            rounds=max(1, args.rounds),
            log=lambda s: print(s, flush=True),
            device=args.device,
            query=args.query,
            load_processes=max(1, args.load_processes),
        )
        print(http_table(results["http"]))
    if "video" in parts:
        from .video_bench import run_video_bench

        print(
            f"video: {args.video_frames}-frame dark clips, H.264 in and out, "
            f"{args.video_rounds} alternating rounds",
            flush=True,
        )
        results["video"] = run_video_bench(
            checkpoint,
            shared,
            video_sizes,
            args.video_frames,
            max(1, args.video_rounds),
            log=lambda s: print(s, flush=True),
            device=args.device,
        )
        print(video_table(results["video"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


def machine(device: str = "cpu") -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    for package in ("numba", "litserve", "triton"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info
