"""Side-by-side grid for the model card: input, then each checkpoint's or each option set's
output, one row per image.

    python -m training.compare --checkpoint A.pt --checkpoint B.pth --out grid.jpg IMAGE...
    python -m training.compare --variant off=denoise=0,exposure=model --variant default= \\
        --crop 200,150,240,160 --out crops.png IMAGE...     # 100% crops, one checkpoint
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model import load_model
from model.enhancer import parse_exposure
from model.imageio import decode_image, tensor_to_rgb


def parse_options(text: str) -> dict:
    """ "denoise=2,exposure=model" -> the keyword arguments of `Enhancer.enhance`."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key == "denoise":
            options[key] = float(value)
        elif key == "exposure":
            options[key] = parse_exposure(value)
        elif key == "strength":
            options[key] = float(value)
        else:
            raise ValueError(f"unknown option {key!r}: denoise, exposure or strength")
    return options


def grid(
    images: list[Path],
    columns: list[tuple],
    labels: list[str],
    width: int,
    crop: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """columns: (enhancer, enhance options) per output column. With `crop` (x, y, w, h) each
    tile is that box of the full-size result, at 100% when width == w."""
    rows = []
    for path in images:
        img = decode_image(path.read_bytes())
        tiles = [img.rgb] + [tensor_to_rgb(e.enhance(img.to_tensor(), **o)) for e, o in columns]
        if crop is not None:
            x, y, w, h = crop
            tiles = [t[y : y + h, x : x + w] for t in tiles]
        h = round(tiles[0].shape[0] * width / tiles[0].shape[1])
        rows.append(
            np.concatenate(
                [np.asarray(Image.fromarray(t).resize((width, h), Image.BILINEAR)) for t in tiles],
                1,
            )
        )
    canvas = Image.fromarray(np.concatenate(rows, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(["input"] + labels):
        draw.rectangle((i * width, 0, i * width + 7 * len(label) + 8, 16), fill=(0, 0, 0))
        draw.text((i * width + 4, 2), label, fill=(255, 255, 255))
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="one column per checkpoint (with --variant: the one checkpoint used)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="LABEL=OPTIONS",
        help="one column per option set, e.g. off=denoise=0,exposure=model",
    )
    p.add_argument("--label", action="append", default=None)
    p.add_argument("--width", type=int, default=320, help="width of each tile")
    p.add_argument("--crop", default=None, metavar="X,Y,W,H", help="a box of each image")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.variant:
        enhancer = load_model((args.checkpoint or [None])[0], device="cpu")
        pairs = [v.partition("=")[::2] for v in args.variant]
        columns = [(enhancer, parse_options(o)) for _, o in pairs]
        labels = args.label or [label for label, _ in pairs]
    else:
        checkpoints = args.checkpoint or [None]
        columns = [(load_model(c, device="cpu"), {}) for c in checkpoints]
        labels = args.label or [Path(c).stem if c else "default" for c in checkpoints]
    crop = tuple(int(v) for v in args.crop.split(",")) if args.crop else None
    grid(args.images, columns, labels, args.width, crop).save(args.out, quality=85)


if __name__ == "__main__":
    main()
