"""Part 1: the model step, uint8 pixels in, uint8 pixels out, for up to four implementations,
each in a process of its own (see run_model_bench):

  fast       `load_model(...)`: the default backend, "auto" (model/backends/: numba on CPU,
             Triton on CUDA),
             EFE + RIE alone (`denoise=0, exposure=None`), the same work as the baselines
  denoise    the same path as `enhance` runs by default: + exposure "auto" and denoising
  torch      `load_model(..., backend="torch")`: the same formulation in plain torch ops
  eager      `load_model(..., backend="eager")`: our eager reference
  onnxruntime  `load_model(..., backend="onnxruntime")`: the exported ONNX graph (model/export.py)
             under ONNX Runtime on the CPU, EFE + RIE alone (informational; the onnx extra)
  published  the published SGZ / Zero-DCE++ test script's formulation, re-stated below

Every timed call is one batch; each cell reports the median. On CUDA the pixels are on the GPU
before the clock starts and each call ends with a synchronize (the model step, not the PCIe
copy). Then the floor: what the arithmetic and the unavoidable memory traffic would cost at the
device's own measured matmul throughput and copy bandwidth.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model import EFE, load_model
from model.rie import STEPS

PUBLISHED_SCALE = 12  # the published test script's `scale_factor = 12`


class PublishedSGZ(nn.Module):
    """The published model's forward, as in its `modeling/model.py` (enhance_net_nopool):
    F.interpolate(scale_factor=1/12), EFE, nn.UpsamplingBilinear2d(scale_factor=12), then
    eight written-out `x = x + x_r * (torch.pow(x, 2) - x)` steps."""

    def __init__(self, state_dict: dict):
        super().__init__()
        self.efe = EFE(level="level" in state_dict)  # our level gain, when the weights have it
        self.efe.load_state_dict(state_dict)
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=PUBLISHED_SCALE)

    def forward(self, x):
        x_down = F.interpolate(x, scale_factor=1 / PUBLISHED_SCALE, mode="bilinear")
        x_r = self.upsample(self.efe(x_down))
        for _ in range(STEPS):
            x = x + x_r * (torch.pow(x, 2) - x)
        return x, x_r


def published_step(net: PublishedSGZ, hwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The published test script around the forward: `np.asarray(img) / 255.0`, `.float()`,
    crop to a multiple of 12, HWC -> CHW by permute (no copy), then torchvision's save_image
    conversion to uint8. Run under no_grad: the script itself leaves autograd on, which is
    slower still, so this is the stronger baseline. On CUDA (hwc a GPU tensor) the division
    runs on the GPU too: the script divides on the CPU and copies 4-byte floats over, which
    would time the PCIe bus instead of the model."""
    if isinstance(hwc, torch.Tensor):
        x = hwc / 255.0
    else:
        x = torch.from_numpy(hwc / 255.0).float()
    h = (x.shape[1] // PUBLISHED_SCALE) * PUBLISHED_SCALE
    w = (x.shape[2] // PUBLISHED_SCALE) * PUBLISHED_SCALE
    x = x[:, :h, :w, :].permute(0, 3, 1, 2)
    with torch.no_grad():
        y, _ = net(x)
    return y.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def photos(shared: Path, size: tuple[int, int], n: int) -> np.ndarray:
    """n real photos (N, H, W, 3) uint8 of size (W, H): top-left crops of the shared photos
    large enough, cycled; a photo too small is resized up (never happens at the standard sizes
    when the 3840x2160 photos are there)."""
    w, h = size
    files = sorted((shared / "data" / "sice-real").glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no photos in {shared / 'data' / 'sice-real'}")
    big = [f for f in files if _size(f)[0] >= w and _size(f)[1] >= h] or files
    out = []
    for i in range(n):
        rgb = _rgb(big[i % len(big)])
        if rgb.shape[1] < w or rgb.shape[0] < h:
            im = Image.fromarray(rgb)
            rgb = np.asarray(im.resize((max(w, im.width), max(h, im.height))))
        out.append(rgb[:h, :w])
    return np.stack(out)


@lru_cache(maxsize=16)
def _rgb(path: Path) -> np.ndarray:
    """A photo decoded once per process: batches of 64 4K crops cycle through a few files."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@cache
def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


NET = {"denoise": 0, "exposure": None}  # EFE + RIE alone: the work the baselines do


def _channels_last(hwc) -> torch.Tensor:
    """(N, H, W, 3) numpy or tensor -> (N, 3, H, W) channels-last view, no copy."""
    t = torch.from_numpy(hwc) if isinstance(hwc, np.ndarray) else hwc
    return t.permute(0, 3, 1, 2)


def paths_for(checkpoint: str, names: list[str], device: str = "cpu") -> dict:
    """name -> callable(hwc batch, nchw batch) for each implementation asked for."""
    make = {}
    # fast and denoise read the photos channels-last, as decoded (a view); torch and eager the
    # planar batch, as before; all but denoise run the network alone
    for name, backend, options, layout in (
        ("fast", "auto", NET, _channels_last),
        ("denoise", "auto", {}, _channels_last),
        ("torch", "torch", NET, None),
        ("eager", "eager", NET, None),
        ("onnxruntime", "onnxruntime", NET, None),
    ):
        if name in names:
            enhancer = load_model(checkpoint, backend=backend, device=device)
            enhancer.warmup()
            make[name] = lambda hwc, t, e=enhancer, o=options, f=layout: e.enhance(
                f(hwc) if f else t, **o
            )
    if "published" in names:
        # reads either checkpoint format
        ref = load_model(checkpoint, backend="eager", device="cpu")
        net = PublishedSGZ(ref.efe.state_dict()).eval().to(device)
        make["published"] = lambda hwc, t: published_step(net, hwc)
    return make


ROUNDS = 4  # processes per path, alternating paths, so slow drift of the machine hits all alike


def run_model_bench(
    checkpoint: str,
    shared: Path,
    sizes,
    batches,
    names,
    repeats: int,
    cell_budget_s: float = 60.0,
    log=print,
    device: str = "cpu",
) -> dict:
    """Each path runs in its own process (`python -m bench.model_bench`), one path after the
    other, four times over. In one process the paths disturbed each other: PyTorch's OpenMP workers
    keep spinning after an eager call, and numba's and PyTorch's thread pools fought for the
    cores (docs/performance.md, "How it is measured"). Up to `repeats` timed calls per path and
    cell; fewer (at least 3) once a cell has taken `cell_budget_s`, so slow baselines at 4K do
    not stretch the run to an hour."""
    times: dict[tuple, list[float]] = {}
    for r in range(ROUNDS):
        share = repeats // ROUNDS + (r < repeats % ROUNDS)
        if share == 0:
            continue
        for name in names:
            for cell in _time_in_child(
                name, checkpoint, shared, sizes, batches, share, cell_budget_s / ROUNDS, device
            ):
                times.setdefault((name, cell["width"], cell["height"], cell["batch"]), []).extend(
                    cell["times"]
                )
    rows = []
    for w, h in sizes:
        for batch in batches:
            for name in names:
                ts = times[name, w, h, batch]
                med = statistics.median(ts)
                rows.append(
                    {
                        "path": name,
                        "width": w,
                        "height": h,
                        "batch": batch,
                        "repeats": len(ts),
                        "ms_per_image": 1000 * med / batch,
                        "images_per_s": batch / med,
                        "min_ms_per_image": 1000 * min(ts) / batch,
                    }
                )
            log(
                f"  {w}x{h} batch {batch}: "
                + ", ".join(
                    f"{r['path']} {r['ms_per_image']:.1f} ms/img" for r in rows[-len(names) :]
                )
            )
    return {"rows": rows, "ratios": ratios(rows), "floor": floor(sizes, device), "device": device}


def _time_in_child(
    name: str,
    checkpoint: str,
    shared: Path,
    sizes,
    batches,
    repeats: int,
    cell_budget_s: float,
    device: str,
) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "bench.model_bench",
        "--path",
        name,
        "--device",
        device,
        "--checkpoint",
        str(checkpoint),
        "--shared",
        str(shared),
        "--repeats",
        str(repeats),
        "--cell-budget",
        str(cell_budget_s),
        "--threads",
        str(torch.get_num_threads()),
        "--sizes",
        ",".join(f"{w}x{h}" for w, h in sizes),
        "--batches",
        ",".join(map(str, batches)),
    ]
    root = Path(__file__).resolve().parent.parent  # so `-m bench...` imports this checkout
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"model bench of {name!r} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def time_path(
    name: str,
    checkpoint: str,
    shared: Path,
    sizes,
    batches,
    repeats: int,
    cell_budget_s: float,
    device: str = "cpu",
) -> list[dict]:
    """In this process: seconds per call of one path, for every cell (after one untimed call
    per cell: allocator, oneDNN primitives, cuDNN plans)."""
    f = paths_for(checkpoint, [name], device)[name]
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    out = []
    for size in sizes:
        for batch in batches:
            hwc = photos(shared, size, batch)
            nchw = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous().to(device)
            if cuda:
                hwc = torch.from_numpy(hwc).to(device)
            f(hwc, nchw)
            sync()
            ts, start = [], time.perf_counter()
            while len(ts) < repeats and (
                len(ts) < 2 or time.perf_counter() - start < cell_budget_s
            ):
                t0 = time.perf_counter()
                f(hwc, nchw)
                sync()
                ts.append(time.perf_counter() - t0)
            out.append({"width": size[0], "height": size[1], "batch": batch, "times": ts})
            del hwc, nchw
            if cuda:
                torch.cuda.empty_cache()  # the next cell's baseline should not page in ours
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """eager / fast and published / fast, per size and batch (how many times faster fast is)."""
    out = []
    cells = {(r["width"], r["height"], r["batch"]) for r in rows}
    for cell in sorted(cells):
        got = {
            r["path"]: r["ms_per_image"]
            for r in rows
            if (r["width"], r["height"], r["batch"]) == cell
        }
        if "fast" not in got:
            continue
        out.append(
            {
                "width": cell[0],
                "height": cell[1],
                "batch": cell[2],
                **{f"{p}_over_fast": got[p] / got["fast"] for p in got if p != "fast"},
            }
        )
    return out


def efe_macs(h: int, w: int) -> int:
    """Multiply-accumulates of EFE at h x w: per block 9 * Cin (depthwise) + Cin * Cout."""
    shapes = [(3, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (64, 3)]
    return h * w * sum(9 * cin + cin * cout for cin, cout in shapes)


def work(width: int, height: int) -> dict:
    """FLOPs (2 per multiply-add) and unavoidable bytes of one image at width x height."""
    values = width * height * 3
    # per value: u8 -> float and /255 (2), bilinear factor upsample (6), 8 RIE steps of
    # x*x, -x, *r, +x (32: Eq. 1), clamp and *255 and round (4)
    macs = efe_macs(round(height / PUBLISHED_SCALE), round(width / PUBLISHED_SCALE))
    flops = 2 * macs + values * 44
    return {"flops": flops, "bytes": 2 * values}  # read the uint8 image once, write it once


def machine_peaks(seconds: float = 0.5, device: str = "cpu") -> dict:
    """The device's fp32 matmul throughput and copy bandwidth, measured now (on CPU: all
    threads; on CUDA: true fp32, TF32 off, and a copy far larger than L2)."""
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    side, copy_bytes = (8192, 2**30) if cuda else (1024, 64 * 2**20)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(side, side, device=device)
        gflops = 2 * side**3 / _seconds_per_call(lambda: torch.mm(a, a), sync, seconds) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / _seconds_per_call(lambda: dst.copy_(src), sync, seconds) / 1e9
    return {"matmul_gflops": gflops, "copy_gb_per_s": gbs}


def _seconds_per_call(f, sync, seconds: float) -> float:
    f()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f()
        n += 1
        sync()
    return (time.perf_counter() - t0) / n


def floor(sizes, device: str = "cpu") -> dict:
    peaks = machine_peaks(device=device)
    out = {"peaks": peaks, "sizes": []}
    for w, h in sizes:
        wk = work(w, h)
        ms = 1000 * max(
            wk["flops"] / (peaks["matmul_gflops"] * 1e9),
            wk["bytes"] / (peaks["copy_gb_per_s"] * 1e9),
        )
        out["sizes"].append({"width": w, "height": h, **wk, "floor_ms": ms})
    return out


def main() -> None:
    """The child process of run_model_bench: times one path, prints JSON."""
    from .cli import PATHS, _list, _size

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--path", required=True, choices=PATHS)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shared", required=True)
    p.add_argument("--sizes", required=True, help="WxH,WxH,...")
    p.add_argument("--batches", required=True, help="1,8,...")
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--cell-budget", type=float, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        json.dumps(
            time_path(
                a.path,
                a.checkpoint,
                Path(a.shared),
                _list(a.sizes, _size),
                _list(a.batches, int),
                a.repeats,
                a.cell_budget,
                a.device,
            )
        )
    )


if __name__ == "__main__":
    main()
