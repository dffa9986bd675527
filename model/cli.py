"""`sgz`: one console script, one subcommand per job. Each package registers its own."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgz", description="SGZ low-light enhancement")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import enhance_cli, export

    enhance_cli.register(sub)
    export.register(sub)
    for module in ("service.cli", "training.cli", "bench.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("service", "training", "bench"):
                continue  # that part is not in this build yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
