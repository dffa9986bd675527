"""`python -m training train|eval ...` mirrors `sgz train|eval`."""

import argparse
import sys

from .cli import register

parser = argparse.ArgumentParser(prog="python -m training")
register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
sys.exit(args.func(args))
