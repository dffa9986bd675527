"""`sgz serve`: run the HTTP service. Flags override SGZ_* environment variables."""

import argparse
import logging
import sys

from pydantic import ValidationError

FLAGS = ("host", "port", "checkpoint", "device")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP service (POST /enhance, GET /factor/..., /metrics)",
        description="Run the HTTP service. Every setting can also come from the environment "
        "(SGZ_HOST, SGZ_PORT, SGZ_CHECKPOINT, SGZ_DEVICE, SGZ_API_KEY, "
        "SGZ_MAX_BATCH_SIZE, ...: see the README); flags win.",
    )
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--checkpoint", help="checkpoint file (default: the built-in checkpoint)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from model import CheckpointError, load_model

    from . import logs, server, tracing
    from .app import create_app
    from .settings import Settings, unknown_variables

    overrides = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
        )
        print(f"sgz serve: invalid setting: {problems}", file=sys.stderr)
        return 2
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logs.configure(settings.log_format, level)
    if unknown := unknown_variables():  # a typo in a name would otherwise go unnoticed
        logging.getLogger("sgz.service").warning(
            "ignoring unknown environment variables: %s", ", ".join(unknown)
        )
    try:
        tracing.install(tracing.from_environment(), tracing.wanted())  # OTEL_* variables
    except ValueError as e:
        print(f"sgz serve: cannot trace: {e}", file=sys.stderr)
        return 2
    # Loaded here, before the server starts, so that a missing or broken checkpoint ends the
    # command with one clear line instead of a lifespan traceback.
    try:
        enhancer = load_model(settings.checkpoint, device=settings.device)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"sgz serve: cannot load the model: {e}", file=sys.stderr)
        return 2
    try:
        return server.run(create_app(settings, enhancer=enhancer), settings)
    finally:
        tracing.shutdown()  # export the spans still buffered
