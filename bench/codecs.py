"""Image coding choices side by side, on an enhanced photo: PNG writers and readers, WebP
effort levels, JPEG. Per call on one thread (median), output size, and how two threads scale
(2.0x = the GIL is released throughout; 1.0x = held).

    python -m bench.codecs --shared ../shared --size 1200x900
"""

import argparse
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image, ImageOps

from model import load_model
from model.imageio import WEBP_METHOD, decode_image, encode_image, tensor_to_rgb
from model.png import decode_png, encode_png


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), out


def two_threads(fn, repeats: int) -> float:
    """Throughput of two threads over one (on a machine with two free cores)."""
    t0 = time.perf_counter()
    for _ in range(2 * repeats):
        fn()
    serial = time.perf_counter() - t0
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda _: fn(), range(2 * repeats)))
        return serial / (time.perf_counter() - t0)


def pillow(rgb: np.ndarray, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **params)
    return buf.getvalue()


def candidates(rgb: np.ndarray, camera_png: bytes) -> dict:
    def pillow_read(data):
        return lambda: np.asarray(Image.open(io.BytesIO(data)))

    return {
        "PNG write, Pillow level 1 (before)": lambda: pillow(rgb, "PNG", compress_level=1),
        "PNG write, Pillow level 6 (its default)": lambda: pillow(rgb, "PNG"),
        "PNG write, Up filter + ISA-L level 1 (ours)": lambda: encode_png(rgb),
        "PNG read of a level-6 PNG, Pillow": pillow_read(camera_png),
        "PNG read of a level-6 PNG, libpng (before)": lambda: imagecodecs.png_decode(camera_png),
        "PNG read, libdeflate + wavefront unfilter (ours)": lambda: decode_png(camera_png),
        "WebP q90, effort 4 (Pillow's default, before)": lambda: pillow(rgb, "WEBP", quality=90),
        f"WebP q90, effort {WEBP_METHOD} (ours)": lambda: encode_image(rgb, None, False, "WEBP"),
        "JPEG q90 write, simplejpeg": lambda: encode_image(rgb, None, False, "JPEG"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default="../shared")
    p.add_argument("--size", default="1200x900")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    photo = sorted((Path(args.shared) / "data" / "sice-real").glob("*.png"))[3]
    dark = ImageOps.fit(Image.open(photo).convert("RGB"), (w, h), Image.Resampling.LANCZOS)
    camera_png = pillow(np.asarray(dark), "PNG")
    rgb = np.ascontiguousarray(
        tensor_to_rgb(load_model().enhance(decode_image(camera_png).to_tensor()))
    )
    print(f"{photo.name} at {w}x{h}, enhanced with the defaults; {args.repeats} calls each")
    print(f"| {'what':48s} | ms/call | bytes out | 2 threads |")
    print(f"|{'-' * 50}|---------|-----------|-----------|")
    for name, fn in candidates(rgb, camera_png).items():
        ms, out = timed(fn, args.repeats)
        size = f"{len(out):,}" if isinstance(out, bytes) else "-"
        scale = two_threads(fn, max(2, args.repeats // 2))
        print(f"| {name:48s} | {ms:7.1f} | {size:>9s} | {scale:8.2f}x |", flush=True)


if __name__ == "__main__":
    main()
