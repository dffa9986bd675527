"""`sgz enhance --ray [ADDRESS]`: the same job as `sgz enhance` (same output names and options),
run on Ray Data, on this machine or a cluster, from and to local folders or any URI pyarrow reads
(s3://, gs://, file://, ...). docs/bulk.md.

The driver lists the inputs (pyarrow.fs), names each output the way `sgz enhance` does and drops
the jobs whose outputs already exist (a rerun resumes), before reading anything. Ray Data then
reads the files' bytes in tasks and hands them to a pool of actors, each holding one model; an
actor decodes, enhances, encodes and writes, or enhances a whole video as one unit of work. Each
bad file comes back as a reason, never as an exception that would stop the job.

Ray and pyarrow are imported only here and only when --ray is used (the `ray` extra).
"""

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from . import ray_jobs
from .ray_jobs import Place, is_uri

LOCAL = "local"  # --ray without ADDRESS: a Ray instance of our own on this machine
OBJECT_STORE = 512 * 2**20  # bytes; compressed images in flight between readers and actors
MAX_THREADS = 4  # numba threads per CPU actor: larger images scale to about this many cores
# rows of jobs per block: each block is a read task and an actor call, tens of ms of Ray's
# overhead that a small image does not pay back; yet at least a few blocks per actor
ROWS_PER_BLOCK, MAX_BLOCKS = 32, 200
READ_TASKS = 4  # reads run ahead of the actors; more only fills the object store
ADDRESS = re.compile(r"^(auto|local|ray://[^\s/]+(:\d+)?/?|[\w.-]+:\d+)$")
EXIT_FAILED_FILES, EXIT_USAGE = 1, 2

RAY_HELP = """\
with --ray: the same job on Ray Data (docs/bulk.md): ADDRESS is auto, ray://HOST:10001 or
HOST:PORT (none: a local Ray instance). INPUTs and OUTDIR may then also be URIs (s3://, gs://,
file://, ...). Outputs already there are skipped, so a rerun resumes (--overwrite: write again).
Put --ray after the INPUTs, or write --ray=ADDRESS.
"""


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bulk jobs on Ray", RAY_HELP)
    g.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: a local instance, or the cluster at ADDRESS",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="with --ray: enhance again the files whose outputs exist",
    )
    g.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help=f"with --ray: model actors (default: one per GPU, else one per {MAX_THREADS} CPUs)",
    )


def path_or_uri(text: str) -> Path | str:
    """argparse type: a URI stays a string (Path would fold its '//'), anything else a Path."""
    return text if is_uri(text) else Path(text)


def has_uri(args) -> bool:
    return any(is_uri(t) for t in [*args.inputs, args.output, args.factor_dir])


def run(args: argparse.Namespace) -> int:
    """`sgz enhance --ray`: the exit status, with `sgz enhance`'s meaning."""
    start = time.perf_counter()
    error = _check_usage(args)
    if error:
        print(f"sgz enhance: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = Place.open(args.output)
        factor = Place.open(args.factor_dir) if args.factor_dir is not None else None
        places = [Place.open(t) for t in args.inputs]
        for p in (out, factor):
            if p is not None:
                p.fs.create_dir(p.path, recursive=True)
        plan = ray_jobs.plan(places, out, factor, args)
    except (OSError, ValueError) as e:  # pyarrow: unknown scheme, no credentials, bad bucket
        print(f"sgz enhance: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for row in plan.failed:
        _fail(plan, row["src"], row["error"])
    if not plan.jobs:
        return _summary(plan, 0, start, args, "")
    try:
        started = start_ray(args.ray)
    except (ConnectionError, RuntimeError) as e:
        print(
            f"sgz enhance: error: cannot connect to Ray at {args.ray}: "
            f"{str(e).splitlines()[0]} (a cluster with token authentication needs "
            "RAY_AUTH_MODE=token and its token here: docs/bulk.md)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        pool = _actors(args)
        done = _execute(plan, places, out, factor, args, pool)
    except _NoGPU as e:
        print(f"sgz enhance: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sgz enhance: interrupted", file=sys.stderr)
        return 130
    finally:
        if started:
            import ray

            ray.shutdown()
    return _summary(plan, done, start, args, pool[2])


def _check_usage(args) -> str | None:
    if args.ray is None:
        return "URIs (s3://, gs://, file://...) are read only with --ray; see docs/bulk.md"
    if not ADDRESS.match(args.ray):
        return (
            f"--ray ADDRESS must be auto, ray://HOST:PORT or HOST:PORT, got {args.ray!r} "
            "(put --ray after the INPUTs, or write --ray=ADDRESS)"
        )
    if args.ray_actors is not None and args.ray_actors < 1:
        return "--ray-actors must be at least 1"
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return "--ray needs Ray Data: pip install 'sgz-serve[ray]'"
    from . import video_cli
    from .checkpoint import CheckpointError
    from .enhancer import load_model

    try:
        video_cli.encoder_options(args)
        load_model(args.checkpoint, device="cpu")  # a bad checkpoint: one error, not N actors'
    except (CheckpointError, ValueError) as e:
        return str(e)
    return None


def start_ray(address: str) -> bool:
    """Connect to Ray (or start our own); True when this call started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    import ray

    if ray.is_initialized():
        return False
    # ERROR: Ray's start-up warnings (token auth on, ...) are not the user's business here
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address == LOCAL:
        ray.init(
            address="local", object_store_memory=OBJECT_STORE, include_dashboard=False, **quiet
        )
    else:
        ray.init(address=address, **quiet)
    return True


class _NoGPU(Exception):
    pass


def _actors(args) -> tuple[int, dict, str]:
    """(actors, ray resources of one, a description): one per GPU, else CPU actors whose numba
    threads together fill the CPUs without oversubscribing them."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus and args.device != "cpu":
        n = args.ray_actors or gpus
        return n, {"num_gpus": 1, "num_cpus": 1, "threads": 0}, f"{n} GPU actor(s)"
    if args.device == "cuda":
        raise _NoGPU("--device cuda: the Ray cluster has no GPU")
    n = args.ray_actors or max(1, cpus // MAX_THREADS)
    threads = max(1, cpus // n)
    return (
        n,
        {"num_gpus": 0, "num_cpus": threads, "threads": threads},
        f"{n} CPU actor(s) x {threads} thread(s)",
    )


def _execute(plan, places, out, factor, args, pool: tuple[int, dict, str]) -> int:
    """Run the jobs on Ray Data, reporting failures as they come; the number written."""
    import ray.data
    import ray.exceptions
    from tqdm import tqdm

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # a plan, progress lines, hints
    n, res, where = pool
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below: one bar
    jobs = len(plan.jobs)
    blocks = max(-(-jobs // ROWS_PER_BLOCK), min(-(-jobs // ray_jobs.BATCH), 4 * n))
    blocks = max(1, min(blocks, MAX_BLOCKS))
    ds = ray.data.from_items(plan.jobs, override_num_blocks=blocks)
    # reading holds no CPU: it waits on storage, while the actors own the cores
    ds = ds.map(
        ray_jobs.read_row,
        fn_kwargs={"places": places},
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=min(READ_TASKS, blocks)),
    )
    worker = {
        "checkpoint": args.checkpoint,
        "device": "cuda" if res["num_gpus"] else "cpu",
        "threads": res["threads"],
        "options": ray_jobs.worker_options(args),
        "places": places,
        "out": out,
        "factor": factor,
    }
    ds = ds.map_batches(
        ray_jobs.Worker,
        batch_size=ray_jobs.BATCH,
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=res["num_cpus"],
        num_gpus=res["num_gpus"],
        fn_constructor_kwargs=worker,
        batch_format="pyarrow",
    )
    done = 0
    with tqdm(
        total=len(plan.jobs),
        unit="file",
        desc=f"enhance on Ray ({where})",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        try:
            for row in ds.iter_rows():
                if row["error"]:
                    bar.clear()
                    _fail(plan, row["src"], row["error"])
                else:
                    done += 1
                bar.update(1)
        except ray.exceptions.RayError as e:  # an actor died (killed, out of memory), ...
            bar.clear()
            _fail(
                plan,
                "the Ray job",
                f"stopped: {str(e).splitlines()[0]}; what was written stays, and a rerun resumes",
            )
    return done


def _fail(plan, source: str, reason: str) -> None:
    plan.failures.append(source)
    print(f"sgz enhance: {source}: {reason}", file=sys.stderr)


def _summary(plan, done: int, start: float, args, where: str) -> int:
    """`sgz enhance`'s policy: 1 if any input failed or nothing was found, else 0."""
    failed = plan.failures
    if done == 0 and not failed and plan.skipped == 0:
        print(
            f"sgz enhance: no image or video found in {', '.join(map(str, args.inputs))}",
            file=sys.stderr,
        )
        return EXIT_FAILED_FILES
    line = (
        f"sgz enhance: {done} file(s) written to {args.output}, {plan.skipped} skipped "
        f"(already there), {len(failed)} failed, in {time.perf_counter() - start:.1f} s"
        + (f" on Ray, {where}" if where else "")
    )
    if failed:
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        line += f"; failed: {', '.join(failed[:10])}{more}"
    print(line, file=sys.stderr)
    return EXIT_FAILED_FILES if failed else 0
