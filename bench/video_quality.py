"""Video quality against a ground truth: PSNR, SSIM, GT-mean PSNR and the temporal warping
error, frame by frame against temporal mode, on the dev clip and on clips synthesized from
real photos (bench/video_clips.py). Makes the README's video table:

    python -m bench.video_quality [--shared ../shared] [--clips dev,pan,pan-bright]

Warping error, the standard measure of flicker: optical flow computed on consecutive ground
truth frames (OpenCV's DIS), the previous output frame warped onto the current one, the mean
absolute difference over pixels whose flow passes a forward-backward check, divided by the
output frame's mean level (so brightness does not decide it); frame pairs with under half the
pixels passing (a cut, a fast pan) are skipped. PSNR and GT-mean PSNR as `sgz eval` computes
them (training/evaluate.py).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

from training.evaluate import gt_mean_psnr, psnr

from .video_clips import default_shared, make_clip


def read_frames(path) -> np.ndarray:
    if str(path).endswith(".npy"):
        return np.load(path)
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


class Flow:
    """The ground truth's flows, computed once and used for every output scored against it."""

    def __init__(self, gt: np.ndarray):
        import cv2

        self.cv2, self.gt = cv2, gt
        T, H, W, _ = gt.shape
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in gt]
        gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
        self.pairs = []
        for t in range(1, T):
            fw = dis.calc(gray[t], gray[t - 1], None)  # where each pixel of t was at t - 1
            bw = dis.calc(gray[t - 1], gray[t], None)
            mx, my = gx + fw[..., 0], gy + fw[..., 1]
            back = cv2.remap(bw, mx, my, cv2.INTER_LINEAR)
            ok = np.linalg.norm(fw + back, axis=-1) < 0.5 + 0.05 * np.linalg.norm(fw, axis=-1)
            self.pairs.append((mx, my, ok))

    def warp_error(self, frames: np.ndarray) -> float:
        errors = []
        for t, (mx, my, ok) in enumerate(self.pairs, start=1):
            if ok.mean() < 0.5:
                continue
            prev = self.cv2.remap(frames[t - 1].astype(np.float32), mx, my, self.cv2.INTER_LINEAR)
            diff = np.abs(frames[t].astype(np.float32) - prev)[ok].mean()
            errors.append(diff / max(float(frames[t].mean()), 1.0))
        return float(np.mean(errors))

    def score(self, frames: np.ndarray) -> dict:
        from skimage.metrics import structural_similarity

        gt = self.gt
        if frames.shape != gt.shape:
            raise ValueError(f"output {frames.shape} against ground truth {gt.shape}")
        return {
            "psnr": float(np.mean([psnr(o, g) for o, g in zip(frames, gt)])),
            "ssim": float(
                np.mean(
                    [
                        structural_similarity(frames[t], gt[t], channel_axis=2, data_range=255)
                        for t in range(0, len(gt), 5)
                    ]
                )
            ),
            "gt_mean_psnr": float(np.mean([gt_mean_psnr(o, g) for o, g in zip(frames, gt)])),
            "warp": self.warp_error(frames),
        }


CLIPS = {  # name: (make_clip keyword arguments) or None for the shared dev clip
    "dev": None,
    "pan": dict(width=640, height=360, frames=90),
    "pan-bright": dict(width=640, height=360, frames=90, level=0.2, flicker=0.3, seed=3),
}


def clip(name: str, shared: Path, work: Path) -> tuple[Path, np.ndarray]:
    if CLIPS[name] is None:
        video = shared / "data" / "video"
        return video / "bbb-dark.mp4", read_frames(video / "bbb-gt.mp4")
    src, gt = work / f"{name}.mp4", work / f"{name}.npy"
    make_clip(src, shared=shared, gt=gt, **CLIPS[name])
    return src, np.load(gt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.video_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shared", type=Path, default=default_shared())
    ap.add_argument("--clips", default=",".join(CLIPS))
    ap.add_argument("--checkpoint", default=None)
    a = ap.parse_args(argv)
    from model import load_model
    from model.video import enhance_video

    enhancer = load_model(a.checkpoint, device="cpu")
    print("| clip | mode | PSNR | SSIM | GT-mean PSNR | warping error |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in a.clips.split(","):
            src, gt = clip(name, a.shared, work)
            flow = Flow(gt)
            rows = [("ground truth", gt), ("input", read_frames(src))]  # its warp: the floor
            for mode, temporal in (("frame by frame", False), ("temporal", True)):
                enhance_video(enhancer, src, work / "out.mp4", temporal=temporal)
                rows.append((mode, read_frames(work / "out.mp4")))
            for mode, frames in rows:
                s = flow.score(frames)
                print(
                    f"| {name} | {mode} | {s['psnr']:.2f} | {s['ssim']:.3f} | "
                    f"{s['gt_mean_psnr']:.2f} | {s['warp']:.4f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
