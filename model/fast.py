"""The fast path behind `Enhancer`: the same EFE + RIE arithmetic, far fewer passes over memory.

Why the eager path is slow on a 2-core CPU (profiled for issue 5 at 1200x900): the whole image
becomes float (13 MB) only to be downscaled by 12; EFE's ~30 small ops are each an OpenMP
fork/join whose waiting thread spins, so on a busy machine every join waits for a scheduler
slice (EFE: 3.5 ms idle, 25-150 ms at load average 6); RIE is ~30 full-size elementwise ops,
each page-faulting a new 13 MB tensor. `NumbaFast` (CPU) instead reads only the 4 source pixels
of each EFE input pixel straight from uint8, runs EFE as one compiled loop nest per block with
at most one fork/join per call, and fuses factor upsampling, the RIE steps and rounding to
uint8 into one pass over the image. Its kernels are compiled on first use, cached on disk
(`Enhancer.warmup()` does it at start) and release the GIL. `TorchFast` is the same
formulation in torch ops, for CUDA and for CPUs without numba. Both match the eager reference
(`fast=False`) within 1 grey level (tests/test_fast.py): only float summation order differs.
"""
import importlib.util
import logging
import os
import shutil
import threading
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch

from .denoise import DenoiseConfig, cell_taps, coefficients, denoise as denoise_reference
from .efe import EFE, level_gain
from .kernels import (HALO, MIN_BAND_ROWS, TINY, efe_items, efe_one, lowres_size, numba,
                      rie_uint8, taps)
from .kernels_dn import denoise_numba
from .kernels_rows import weighted_rows
from .rie import upsample_factor

log = logging.getLogger("sgz.model")

NO_DENOISE = DenoiseConfig()


# ---- the two fast paths --------------------------------------------------------------------

def channels_last(images: torch.Tensor) -> bool:
    """(N, 3, H, W) stored as (N, H, W, 3): what `DecodedImage.to_tensor` gives."""
    return images.dim() == 4 and images.permute(0, 2, 3, 1).is_contiguous()


def check_factor(images: torch.Tensor, r_low: torch.Tensor) -> None:
    if r_low.dim() != 4 or r_low.shape[1] != 3 or r_low.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"factor map must have shape (1 or {images.shape[0]}, 3, h, w), "
                         f"got {tuple(r_low.shape)}")


class NumbaFast:
    """CPU: numba kernels. Inputs: uint8 (N, 3, H, W) CPU tensors, already validated."""
    name = "numba"
    _launch = threading.Lock()  # one kernel at a time per process: each one uses every core

    @staticmethod
    def available() -> bool:
        return numba is not None

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        self.scale_factor, self.steps = scale_factor, steps
        self.level = None if efe.level is None else efe.level.detach().cpu().float().clone()
        blocks = [self._fold(getattr(efe, f"e_conv{k}")) for k in range(1, 8)]
        self.weights = tuple(tuple(b[i] for b in blocks) for i in range(3))  # dws, pws, biases

    @staticmethod
    def _fold(block):
        """(depthwise 3x3, pointwise matrix, bias) with the depthwise bias folded into the
        pointwise one: pw @ (dw * x + bd) + bp = pw @ (dw * x) + (pw @ bd + bp)."""
        dw, bd, pw, bp = (t.detach().cpu().double() for t in (
            block.depth_conv.weight, block.depth_conv.bias,
            block.point_conv.weight, block.point_conv.bias))
        pw = pw[:, :, 0, 0]
        folded = tuple(t.float().numpy().copy() for t in (dw[:, 0], pw, pw @ bd + bp))
        for t in folded:  # near-dead weights: see kernels.TINY
            t[np.abs(t) < TINY] = 0
        return folded

    @staticmethod
    def _run(kernel, *args):
        """Launch a parallel kernel: one at a time per process (model/temporal.py's too)."""
        with NumbaFast._launch:  # follows torch's thread setting, so one knob limits both
            numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
            kernel(*args)

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        """A batch runs one image per thread. A single image is cut into two bands of EFE rows
        that overlap by HALO rows on each side of the cut, one per thread: the wrong (zero)
        padding at a band's cut edge reaches one row further per 3x3 block, so rows HALO or
        more from the cut are exact, and each band keeps only those."""
        # a channels-last batch as an (N, 3, H, W) view: the downscale reads only 4 pixels
        # per EFE pixel, in any layout
        img = images.numpy() if channels_last(images) else images.contiguous().numpy()
        n, _, H, W = img.shape
        h, w = lowres_size(H, W, self.scale_factor)
        y0, y1, ly = taps(H, h, False)
        threads = torch.get_num_threads()
        if n == 1 and (h < MIN_BAND_ROWS or threads < 2):
            which, rows = np.zeros(1, np.int64), [slice(0, h)]
        elif n == 1:  # two bands of `length` rows: [0, length) and [h - length, h)
            length = min(h, (h + 1) // 2 + HALO)
            which, rows = np.zeros(2, np.int64), [slice(0, length), slice(h - length, h)]
        else:
            which, rows = np.arange(n), [slice(0, h)] * n
        hb = rows[0].stop - rows[0].start
        out = np.zeros((len(rows), 3, hb + 2, w + 2), np.float32)
        ys = [np.stack([t[r] for r in rows]) for t in (y0, y1, ly)]
        xs = taps(W, w, False)
        cut = (h + 1) // 2
        # the rows each item keeps, in its own row numbers: the two bands meet at the cut
        lo, hi = np.zeros(len(rows), np.int64), np.full(len(rows), hb, np.int64)
        if n == 1 and len(rows) == 2:
            hi[0], lo[1] = cut, cut - (h - hb)
        if len(rows) == 1:  # on the calling thread: waking the pool would cost more
            efe_one(img[0], ys[0][0], ys[1][0], ys[2][0], *xs, *self.weights, out[0], lo[0],
                    hi[0])
        else:
            self._run(efe_items, img, which, *ys, *xs, *self.weights, out, lo, hi)
        out = out[:, :, 1:-1, 1:-1]
        if n == 1 and len(rows) == 2:
            out = np.concatenate([out[:1, :, :hi[0]], out[1:, :, lo[1]:]], axis=2)
        out = np.ascontiguousarray(out)
        if self.level is not None:  # the kernels run the paper's EFE; the gain needs only the mean
            mu = downscaled_mean(img, (y0, y1, ly), xs)
            gain = level_gain(torch.from_numpy(mu), self.level).numpy()
            out *= gain[:, None, None, None]
            np.clip(out, -1, 1, out=out)  # as efe.apply_level
        return torch.from_numpy(out)

    def apply_factor(self, images: torch.Tensor, r_low: torch.Tensor, denoise: float = 0.0,
                     config: DenoiseConfig = NO_DENOISE) -> torch.Tensor:
        check_factor(images, r_low)
        if denoise > 0 and not channels_last(images):  # its kernels read channels-last rows
            cl = images.contiguous(memory_format=torch.channels_last)
            return self.apply_factor(cl, r_low, denoise, config).contiguous()
        r = r_low.detach().to("cpu", torch.float32).contiguous().numpy()
        (n, c, H, W), (n_r, h, w) = images.shape, (r.shape[0], *r.shape[-2:])
        row_taps, col_taps = host_taps(h, H, True), host_taps(w, W, True)
        if channels_last(images):  # answered in the same layout: no transposes either side
            img = images.permute(0, 2, 3, 1).numpy().reshape(n, H, W * c)
            out = np.empty_like(img)
            if denoise > 0:  # RIE fused with the denoising statistics
                denoise_numba(img, out, r, denoise, config, self.steps, self._run)
            else:
                self._run(rie_uint8, img, r, *row_taps, *col_taps, self.steps, out)
            return torch.from_numpy(out).view(n, H, W, c).permute(0, 3, 1, 2)
        img = images.contiguous().numpy().reshape(n * c, H, W)  # planes as 1-channel images
        out = np.empty_like(img)
        self._run(rie_uint8, img, r.reshape(n_r * c, 1, h, w), *row_taps, *col_taps,
                  self.steps, out)
        return torch.from_numpy(out).view(n, c, H, W)


def downscaled_mean(img: np.ndarray, ys: tuple, xs: tuple) -> np.ndarray:
    """Per image of img (N, 3, H, W) uint8, the mean of EFE's input, the bilinear downscale of
    img / 255 at the taps, without building it: the downscale is linear, so its mean is a
    weighted sum over the few source rows and columns it reads. A serial numba loop, not torch
    or BLAS: their thread pools, woken right after a numba kernel, cost 2-20 ms."""
    (y0, y1, ly), (x0, x1, lx) = ys, xs
    H, W = img.shape[-2:]
    wr, wc = np.zeros(H, np.float32), np.zeros(W, np.float32)
    np.add.at(wr, y0, 1 - ly)
    np.add.at(wr, y1, ly)
    np.add.at(wc, x0, 1 - lx)
    np.add.at(wc, x1, lx)
    rows = np.flatnonzero(wr)
    if img.strides[1] == 1:  # channels-last memory: rows of (W, 3) pixels, 3x less work as such
        hwc = img.transpose(0, 2, 3, 1).reshape(img.shape[0], H, -1)
        sums = weighted_rows(hwc, rows, wr[rows], np.repeat(wc, 3))
    else:
        planes = img.reshape(-1, H, W)
        sums = weighted_rows(planes, rows, wr[rows], wc).reshape(-1, 3).sum(1)
    return (sums / np.float32(255 * 3 * len(ly) * len(lx))).astype(np.float32)


host_taps = lru_cache(maxsize=256)(taps)  # `taps`, kept: the same sizes come again


@lru_cache(maxsize=256)
def cell_taps_on(n: int, cell: int, device: torch.device):
    """`denoise.cell_taps` as tensors on the device, kept."""
    return tuple(torch.from_numpy(t).to(device) for t in cell_taps(n, cell))


@lru_cache(maxsize=256)
def device_taps(n_in: int, n_out: int, align_corners: bool, device: torch.device):
    """`taps` as tensors on the device, kept: a video stream asks for the same few sizes."""
    return tuple(torch.from_numpy(t).to(device) for t in taps(n_in, n_out, align_corners))


def efe_input(images: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """EFE's input, images / 255 downscaled (bilinear), read from only the 4 source pixels of
    each output pixel."""
    if scale_factor == 1:
        return images.float().div_(255)
    H, W = images.shape[-2:]
    h, w = lowres_size(H, W, scale_factor)
    y0, y1, ly = device_taps(H, h, False, images.device)
    x0, x1, lx = device_taps(W, w, False, images.device)
    rows = images.index_select(2, torch.cat([y0, y1]))
    v = rows.index_select(3, torch.cat([x0, x1])).float().div_(255)
    t = v[..., :w] * (1 - lx) + v[..., w:] * lx
    ly = ly[:, None]
    return t[:, :, :h] * (1 - ly) + t[:, :, h:] * ly


class TorchFast:
    """Any device: the same formulation in torch ops (CUDA, or CPU without numba)."""
    name = "torch"

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        self.efe, self.scale_factor, self.steps = efe, scale_factor, steps

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        return self.efe(efe_input(images, self.scale_factor))

    def apply_factor(self, images: torch.Tensor, r_low: torch.Tensor, denoise: float = 0.0,
                     config: DenoiseConfig = NO_DENOISE) -> torch.Tensor:
        check_factor(images, r_low)
        x = images.float().div_(255)
        r = upsample_factor(r_low.to(images.device, torch.float32), tuple(images.shape[-2:]))
        t = torch.empty_like(x)
        for _ in range(self.steps):  # Eq. 1, in place: the same roundings as rie()
            torch.mul(x, x, out=t).sub_(x).mul_(r)
            x.add_(t)
        out = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        if denoise > 0:
            out = denoise_reference(images, out, r_low, denoise, config, self.steps)
        return out


class TritonFast(TorchFast):
    """CUDA: EFE (at 1/12 of the pixels) in cuDNN as TorchFast; the full-size pass, factor
    upsampling + RIE + rounding, as one Triton kernel (model/triton_kernels.py). On a CPU
    tensor it runs only under Triton's interpreter (the tests' way to check it without a GPU)."""
    name = "triton"

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        # cuDNN's depthwise convolutions run faster on NHWC maps (bench/gpu_efe.py)
        super().__init__(efe.to(memory_format=torch.channels_last), scale_factor, steps)

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("triton") is not None

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        x = efe_input(images, self.scale_factor).contiguous(memory_format=torch.channels_last)
        return self.efe(x).contiguous()

    def apply_factor(self, images: torch.Tensor, r_low: torch.Tensor, denoise: float = 0.0,
                     config: DenoiseConfig = NO_DENOISE) -> torch.Tensor:
        from . import triton_kernels  # imported on first use: triton takes ~1 s to import
        check_factor(images, r_low)
        cl = channels_last(images)
        if not cl:
            images = images.contiguous()
        out = torch.empty_like(images)  # same layout as the input: answered as it came
        r = r_low.detach().to(images.device, torch.float32).contiguous()
        (n, _, H, W), (h, w) = images.shape, r.shape[-2:]
        length = 3 * W if cl else W  # values per program row
        blocks = -(-length // triton_kernels.BLOCK)
        rows = n * H if cl else n * 3 * H
        s_r_n = r.stride(0) if r.shape[0] == n else 0
        with torch.cuda.device(images.device) if images.is_cuda else nullcontext():
            triton_kernels.rie_uint8[(rows * blocks,)](
                images, out, r, *device_taps(h, H, True, images.device),
                *device_taps(w, W, True, images.device), H, W, blocks,
                images.stride(0), images.stride(2), images.stride(1),
                out.stride(0), out.stride(2), out.stride(1), s_r_n, r.stride(1), r.stride(2),
                STEPS=self.steps, CHANNELS_LAST=cl, BLOCK=triton_kernels.BLOCK)
        if denoise > 0:  # statistics and coefficients in torch ops, the full-size pass fused
            out = self._denoise(images, out, r, denoise, config)
        return out

    def _denoise(self, images, enhanced, r, denoise, config):
        from . import triton_kernels
        coef = coefficients(images, enhanced, r, denoise, config, self.steps).contiguous()
        out = torch.empty_like(enhanced)
        (n, _, H, W), (hc, wc) = enhanced.shape, coef.shape[-2:]
        blocks = -(-W // triton_kernels.BLOCK)
        s_n, s_c, s_y, s_x = enhanced.stride()
        with torch.cuda.device(images.device) if images.is_cuda else nullcontext():
            triton_kernels.denoise_apply[(n * H * blocks,)](
                enhanced, out, coef, *cell_taps_on(H, config.cell, images.device),
                *cell_taps_on(W, config.cell, images.device), H, W, blocks, hc, wc,
                s_n, s_y, s_x, s_c, BLOCK=triton_kernels.BLOCK)
        return out


BACKENDS = {"numba": NumbaFast, "triton": TritonFast, "torch": TorchFast}


def build(efe: EFE, device: torch.device, scale_factor: float, steps: int,
          backend: str | None = None):
    """The fastest path for the device: numba kernels on CPU, a Triton kernel on CUDA, plain
    torch ops where neither is installed. `backend` forces one (benchmarks, tests)."""
    if backend == "onnxruntime":  # optional (the onnx extra): imported only when asked for
        from .onnx_backend import OnnxRuntimeFast
        return OnnxRuntimeFast.on(device, efe, scale_factor, steps)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: one of {sorted(BACKENDS)} or 'eager'")
        if backend != "torch" and not BACKENDS[backend].available():
            raise ValueError(f"backend {backend!r} is not installed")
        if backend == "numba" and device.type != "cpu":
            raise ValueError("the numba backend runs on the CPU only")
        return BACKENDS[backend](efe, scale_factor, steps)
    return choose(device)(efe, scale_factor, steps)


def choose(device: torch.device) -> type:
    """The default path's class for the device. Triton builds a small C launcher at its first
    kernel launch on a GPU: without a C compiler that launch fails, so the torch path runs
    instead, with a warning, rather than a service that never becomes ready."""
    if device.type == "cpu" and NumbaFast.available():
        return NumbaFast
    if device.type == "cuda" and TritonFast.available():
        if c_compiler() is not None:
            return TritonFast
        log.warning("no C compiler (gcc, clang or $CC) for Triton's launcher: the CUDA path "
                    "runs in torch ops instead (slower); install gcc to use the Triton kernel")
    return TorchFast


def c_compiler() -> str | None:
    """The compiler Triton would use: $CC, else cc, gcc or clang on the PATH."""
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))),
                                        None)

