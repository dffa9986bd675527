"""EFE on CUDA in the layouts and cuDNN modes the fast path could use: time per batch and the
largest difference of x_r from a float64 CPU reference. For choosing the triton backend's EFE set-up
on a GPU machine (scripts/gpu-check.sh); prints a table.

    python -m bench.gpu_efe [--batch 256] [--size 75x100]
"""

import argparse
import time

import torch

from model import EFE

from .tables import table


def variants():
    """name -> (memory format, cudnn.benchmark, TF32 allowed)"""
    return {
        "NCHW": (torch.contiguous_format, False, True),
        "NCHW, no TF32": (torch.contiguous_format, False, False),
        "NCHW, cudnn.benchmark": (torch.contiguous_format, True, True),
        "NHWC": (torch.channels_last, False, True),
        "NHWC, no TF32": (torch.channels_last, False, False),
        "NHWC, cudnn.benchmark": (torch.channels_last, True, True),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", default="75x100", help="EFE input HxW (1200x900 / 12 = 75x100)")
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    h, w = map(int, a.size.split("x"))
    gen = torch.Generator().manual_seed(0)
    efe = EFE()
    efe.init_weights(std=0.3, generator=gen)  # larger than training's init: a busy factor map
    x = torch.rand(a.batch, 3, h, w, generator=gen)
    with torch.no_grad():
        ref = efe.double()(x.double()[:4]).float()
    rows = []
    for name, (fmt, bench, tf32) in variants().items():
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = bench, tf32
        net = EFE().cuda().eval()
        net.load_state_dict(efe.float().state_dict())
        net = net.to(memory_format=fmt)
        xg = x.cuda().contiguous(memory_format=fmt)
        with torch.inference_mode():
            for _ in range(3):
                out = net(xg)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                out = net(xg)
            torch.cuda.synchronize()
            ms = 1000 * (time.perf_counter() - t0) / a.repeats
        err = (out[:4].float().cpu() - ref).abs().max().item()
        rows.append(
            [
                name,
                f"{ms:.3f}",
                f"{1000 * ms / a.batch:.2f}",
                f"{a.batch / ms * 1000:.0f}",
                f"{err:.1e}",
            ]
        )
    print(
        table(
            [
                "EFE variant",
                f"ms / batch of {a.batch}",
                "us / image",
                "images/s",
                "max |x_r - fp64|",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
