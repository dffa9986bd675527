"""`backend="numba"` (CPU): the same EFE + RIE arithmetic as the eager reference in far fewer
passes over memory, as numba kernels (model/kernels*.py, imported here only: importing them
imports and configures numba).

It reads only the 4 source pixels of each EFE input pixel straight from uint8, runs EFE as one
compiled loop nest per block with at most one fork/join per call, and fuses factor upsampling,
the RIE steps and rounding to uint8 into one pass over the image (with the denoiser's
statistics when it is on). Why the eager path is slower on a small CPU, and by how much:
docs/performance.md, "What the fast path does". Kernels are compiled on first use, cached on
disk (`Enhancer.warmup()` does it at start) and release the GIL. It matches the eager
reference within 1 grey level (tests/test_fast.py): only float summation order differs.
"""

import importlib.util
import threading

import numpy as np
import torch

from ..denoise import DenoiseConfig
from ..efe import EFE, level_gain
from ..resample import host_taps, lowres_size, taps
from .base import NO_DENOISE, Availability, Backend, channels_last, check_factor

_launch = threading.Lock()  # one kernel at a time per process: each one uses every core


def launch(kernel, *args) -> None:
    """Launch a parallel numba kernel: one at a time per process (numba's workqueue pool is not
    safe for concurrent launches), on as many threads as torch's setting (one knob for both)."""
    from ..kernels import numba

    with _launch:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        kernel(*args)


def fold(block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depthwise 3x3, pointwise matrix, bias) with the depthwise bias folded into the
    pointwise one: pw @ (dw * x + bd) + bp = pw @ (dw * x) + (pw @ bd + bp)."""
    from ..kernels import TINY

    dw, bd, pw, bp = (
        t.detach().cpu().double()
        for t in (
            block.depth_conv.weight,
            block.depth_conv.bias,
            block.point_conv.weight,
            block.point_conv.bias,
        )
    )
    pw = pw[:, :, 0, 0]
    folded = tuple(t.float().numpy().copy() for t in (dw[:, 0], pw, pw @ bd + bp))
    for t in folded:  # near-dead weights: see kernels.TINY
        t[np.abs(t) < TINY] = 0
    return folded


class NumbaBackend(Backend):
    """Inputs: uint8 (N, 3, H, W) CPU tensors, planar or channels-last."""

    name = "numba"

    @classmethod
    def available(cls, device: torch.device) -> Availability:
        if importlib.util.find_spec("numba") is None:
            return Availability(False, "numba is not installed")
        if device.type != "cpu":
            return Availability(False, "the numba backend runs on the CPU only")
        return Availability(True)

    def __init__(self, efe: EFE, scale_factor: float, steps: int):
        super().__init__(efe, scale_factor, steps)
        self.level = None if efe.level is None else efe.level.detach().cpu().float().numpy().copy()
        blocks = [fold(getattr(efe, f"e_conv{k}")) for k in range(1, 8)]
        self.weights = tuple(tuple(b[i] for b in blocks) for i in range(3))  # dws, pws, biases

    def factor_lowres(self, images: torch.Tensor) -> torch.Tensor:
        """A batch runs one image per thread. A single image is cut into two bands of EFE rows
        that overlap by HALO rows on each side of the cut, one per thread: the wrong (zero)
        padding at a band's cut edge reaches one row further per 3x3 block, so rows HALO or
        more from the cut are exact, and each band keeps only those."""
        from ..kernels import HALO, MIN_BAND_ROWS, efe_items, efe_one

        # a channels-last batch as an (N, 3, H, W) view: the downscale reads only 4 pixels
        # per EFE pixel, in any layout
        img = images.numpy() if channels_last(images) else images.contiguous().numpy()
        n, _, H, W = img.shape
        h, w = lowres_size(H, W, self.scale_factor)
        y0, y1, ly = taps(H, h, False)
        if n == 1 and (h < MIN_BAND_ROWS or torch.get_num_threads() < 2):
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
            efe_one(img[0], ys[0][0], ys[1][0], ys[2][0], *xs, *self.weights, out[0], lo[0], hi[0])
        else:
            launch(efe_items, img, which, *ys, *xs, *self.weights, out, lo, hi)
        out = out[:, :, 1:-1, 1:-1]
        if n == 1 and len(rows) == 2:
            out = np.concatenate([out[:1, :, : hi[0]], out[1:, :, lo[1] :]], axis=2)
        out = np.ascontiguousarray(out)
        if self.level is not None:  # the kernels run the paper's EFE; the gain needs only the mean
            mu = downscaled_mean(img, (y0, y1, ly), xs)
            # numpy, not torch: two torch ops here (on N means) left glibc's heaps holding
            # 2.9 GB instead of 0.8 under sustained load (docs/service.md, "Memory, and a soak")
            gain = level_gain(mu, self.level)
            out *= gain[:, None, None, None]
            np.clip(out, -1, 1, out=out)  # as efe.apply_level
        return torch.from_numpy(out)

    def apply_factor(
        self,
        images: torch.Tensor,
        r_low: torch.Tensor,
        denoise: float = 0.0,
        config: DenoiseConfig = NO_DENOISE,
    ) -> torch.Tensor:
        from ..kernels_dn import denoise_numba
        from ..kernels_rie import rie_uint8

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
                denoise_numba(img, out, r, denoise, config, self.steps, launch)
            else:
                launch(rie_uint8, img, r, *row_taps, *col_taps, self.steps, out)
            return torch.from_numpy(out).view(n, H, W, c).permute(0, 3, 1, 2)
        img = images.contiguous().numpy().reshape(n * c, H, W)  # planes as 1-channel images
        out = np.empty_like(img)
        launch(rie_uint8, img, r.reshape(n_r * c, 1, h, w), *row_taps, *col_taps, self.steps, out)
        return torch.from_numpy(out).view(n, c, H, W)

    def frame_noise(self, frames: torch.Tensor, cell: int, quantile: float) -> np.ndarray:
        from ..kernels_temporal import noise_sigma

        n, c, H, W = frames.shape
        rows = frames.permute(0, 2, 3, 1).contiguous().numpy().reshape(n, H, W * c)
        return noise_sigma(rows, cell, quantile)

    def temporal_filter(self, acc, frame, out, k, radius, min_weight, spare):
        from ..kernels_temporal import recursive_filter

        H, W, c = frame.shape
        if spare is None or spare.shape != acc.shape:
            spare = torch.empty_like(acc)
        launch(
            recursive_filter,
            frame.contiguous().numpy().reshape(H, W * c),
            acc.numpy().reshape(H, W * c),
            spare.numpy().reshape(H, W * c),
            out.numpy().reshape(H, W * c),
            np.float32(k),
            radius,
            np.float32(min_weight),
        )
        return spare


def downscaled_mean(img: np.ndarray, ys: tuple, xs: tuple) -> np.ndarray:
    """Per image of img (N, 3, H, W) uint8, the mean of EFE's input, the bilinear downscale of
    img / 255 at the taps, without building it: the downscale is linear, so its mean is a
    weighted sum over the few source rows and columns it reads. A serial numba loop, not torch
    or BLAS: their thread pools, woken right after a numba kernel, cost more than the sum."""
    from ..kernels_rows import weighted_rows

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
