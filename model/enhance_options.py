"""Option parsing shared by `sgz enhance`, `sgz export` and `sgz eval`: --denoise, --exposure
and --quality, validated the way `Enhancer.enhance` and the encoders take them."""

import argparse

from .enhancer import DENOISE, MAX_DENOISE, check_options, parse_exposure


def add_quality_options(p: argparse.ArgumentParser) -> None:
    """--denoise and --exposure, as `Enhancer.enhance` takes them (also used by `sgz eval`)."""
    p.add_argument(
        "--denoise",
        type=_denoise,
        default=DENOISE,
        metavar=f"0-{MAX_DENOISE:g}",
        help=f"noise removal: 0 = off, 1 = default, up to {MAX_DENOISE:g} = stronger",
    )
    p.add_argument(
        "--exposure",
        type=_exposure,
        default="auto",
        metavar="auto|model|0.05-0.95",
        help="auto (default): lift images darker than mean 0.40 up to it; model: "
        "the model's own level; a number: the mean brightness to reach",
    )


def _denoise(text: str) -> float:
    try:
        d = float(text)
        check_options(1.0, d, None)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"denoise must be a number in 0..{MAX_DENOISE:g}, got {text!r}"
        ) from e
    return d


def _exposure(text: str):
    try:
        return parse_exposure(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def quality(text: str) -> int:
    q = int(text)
    if not 1 <= q <= 100:
        raise argparse.ArgumentTypeError(f"quality must be in 1..100, got {q}")
    return q
