"""Side-by-side grid for the model card: input, then each checkpoint's output, one row per image.

    python -m training.compare --checkpoint A.pt --checkpoint B.pth --out grid.jpg IMAGE...
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model import load_model
from model.imageio import decode_image, tensor_to_rgb


def grid(images: list[Path], checkpoints: list[str], labels: list[str], width: int) -> Image.Image:
    enhancers = [load_model(c, device="cpu") for c in checkpoints]
    rows = []
    for path in images:
        img = decode_image(path.read_bytes())
        tiles = [img.rgb] + [tensor_to_rgb(e.enhance(img.to_tensor())) for e in enhancers]
        h = round(img.rgb.shape[0] * width / img.rgb.shape[1])
        rows.append(np.concatenate(
            [np.asarray(Image.fromarray(t).resize((width, h), Image.BILINEAR)) for t in tiles], 1))
    canvas = Image.fromarray(np.concatenate(rows, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(["input"] + labels):
        draw.rectangle((i * width, 0, i * width + 7 * len(label) + 8, 16), fill=(0, 0, 0))
        draw.text((i * width + 4, 2), label, fill=(255, 255, 255))
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--checkpoint", action="append", required=True)
    p.add_argument("--label", action="append", default=None)
    p.add_argument("--width", type=int, default=320, help="width of each tile")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    labels = args.label or [Path(c).stem for c in args.checkpoint]
    grid(args.images, args.checkpoint, labels, args.width).save(args.out, quality=85)


if __name__ == "__main__":
    main()
