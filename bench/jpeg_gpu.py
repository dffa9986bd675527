"""JPEG coding rate on the GPU (nvImageCodec, model/gpu_jpeg.py) against the CPU (libjpeg-turbo,
model/imageio.py): images/s decoded and encoded again (what one request costs in coding), from
T threads as the service's pools run them, and nvImageCodec's batched calls; same photos, same
run, ratios to the CPU at the same thread count.

    python -m bench.jpeg_gpu --shared ../shared --size 1200x900 --threads 1,4,16
"""

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model import gpu_jpeg
from model.gpu_jpeg import open_gpu_jpeg
from model.imageio import decode_image, encode_image

from .http_cases import Case, write_case


def rate(one, items: list[bytes], threads: int, seconds: float) -> float:
    """Items/s with `threads` threads each calling `one(item)` in turn until `seconds` pass."""
    for item in items[:threads]:  # first calls: per-thread set-up, not timed
        one(item)
    done, stop = [0] * threads, time.perf_counter() + seconds

    def loop(t: int) -> None:
        i = t
        while time.perf_counter() < stop:
            one(items[i % len(items)])
            done[t] += 1
            i += threads

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=os.environ.get("SGZ_SHARED", "../shared"))
    p.add_argument("--size", default="1200x900")
    p.add_argument("--threads", default="1,4,16")
    p.add_argument("--batches", default="8,32", help="images per batched nvImageCodec call")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--own-streams", action="store_true", help="also: a CUDA stream per thread")
    p.add_argument("--helpers", default="0,4", help="nvImageCodec helper threads per coder to try")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_case(Path(args.shared), Case("jpeg", args.size), Path(tmp))
        photos = [f.read_bytes() for f in sorted(Path(tmp).iterdir())]
    print(f"{len(photos)} photos at {args.size}, JPEG q90; images/s decoded + encoded")

    def cpu(data: bytes) -> bytes:
        d = decode_image(data)
        return encode_image(d.rgb, None, False, "JPEG", 90)

    gpu, why = open_gpu_jpeg("gpu", "cuda") if torch.cuda.is_available() else (None, "no GPU")
    print(why)

    def on_gpu(data: bytes) -> bytes | None:
        assert gpu is not None
        got = gpu.decode(data, None)
        assert got is not None, "the GPU declined a photo"
        return gpu.encode(got[1], 90)

    for threads in map(int, args.threads.split(",")):
        base = rate(cpu, photos, threads, args.seconds)
        line = f"threads {threads:3d}: CPU {base:8.1f}"
        if gpu is not None:
            g = rate(on_gpu, photos, threads, args.seconds)
            line += f"   GPU {g:8.1f}  ({g / base:.2f}x)"
        print(line, flush=True)
    if gpu is None:
        return
    # where the GPU's time goes: decode alone, encode alone, and nvImageCodec's helper threads
    answer = gpu.decode(photos[0], None)
    assert answer is not None
    for threads in map(int, args.threads.split(",")):
        d = rate(lambda b: gpu.decode(b, None), photos, threads, args.seconds)
        e = rate(lambda _: gpu.encode(answer[1], 90), photos, threads, args.seconds)
        print(f"threads {threads:3d}: GPU decode only {d:8.1f}, encode only {e:8.1f}", flush=True)
    if args.own_streams:  # each thread on its own CUDA stream, against torch's current one
        gpu_jpeg.OWN_STREAMS = True
        gpu, _ = open_gpu_jpeg("gpu", "cuda")
        for threads in map(int, args.threads.split(",")):
            g = rate(on_gpu, photos, threads, args.seconds)
            print(f"threads {threads:3d}, own CUDA streams: GPU {g:8.1f}", flush=True)
        gpu_jpeg.OWN_STREAMS = False
    for helpers in map(int, args.helpers.split(",")):
        gpu_jpeg.CODER_THREADS = helpers
        gpu, _ = open_gpu_jpeg("gpu", "cuda")  # new coders per thread, `helpers` threads each
        for threads in map(int, args.threads.split(",")):
            g = rate(on_gpu, photos, threads, args.seconds)
            print(f"threads {threads:3d}, {helpers} helper threads each: GPU {g:8.1f}", flush=True)
    nv, local = gpu.nv, threading.local()
    params = nv.EncodeParams(
        quality_type=nv.QualityType.QUALITY,
        quality_value=90,
        chroma_subsampling=nv.ChromaSubsampling.CSS_420,
    )

    def batched(batch: list[bytes]) -> None:
        if not hasattr(local, "dec"):
            local.dec, local.enc = nv.Decoder(), nv.Encoder()
        images = local.dec.decode(batch)
        local.enc.encode(images, "jpeg", params=params)

    for size in map(int, args.batches.split(",")):
        groups = [[photos[(i + k) % len(photos)] for k in range(size)] for i in range(len(photos))]
        for threads in (1, 4):
            r = size * rate(batched, groups, threads, args.seconds)
            print(f"batched {size:3d} x {threads} threads: GPU {r:8.1f}", flush=True)


if __name__ == "__main__":
    main()
