"""`sgz eval`: full-reference scores on paired folders, no-reference scores on unpaired ones.

Paired (LOL-style, same file names in --low and --high): PSNR, SSIM and GT-mean PSNR (the
output scaled so that its mean matches the ground truth's: the protocol that removes the global
brightness choice a zero-reference method cannot know), and as a diagnostic the same with each
channel scaled to the ground truth's channel mean. Unpaired: mean brightness and PIQE.
"""

import json
import time
from pathlib import Path

import numpy as np

from model import load_model
from model.enhancer import DENOISE
from model.imageio import decode_image, encode_image, tensor_to_rgb

from .data import list_images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def gt_mean_psnr(out: np.ndarray, gt: np.ndarray) -> float:
    o = out.astype(np.float64)
    scaled = np.clip(o * (gt.mean() / max(o.mean(), 1e-6)), 0, 255)
    return psnr(scaled, gt)


def channel_gt_mean_psnr(out: np.ndarray, gt: np.ndarray) -> float:
    """GT-mean PSNR with each channel scaled to the ground truth's channel mean: an oracle that
    also removes any colour cast, so what is left is how the brightening is spread."""
    o = out.astype(np.float64)
    scale = gt.reshape(-1, 3).mean(0) / np.maximum(o.reshape(-1, 3).mean(0), 1e-6)
    return psnr(np.clip(o * scale, 0, 255), gt)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def piqe(rgb: np.ndarray) -> float:
    """PIQE (Venkatanath et al. 2015): lower is better; runs offline."""
    from pypiqe import piqe as _piqe

    gray = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(_piqe(gray)[0])


def _require_scoring():
    try:
        import pypiqe  # noqa: F401
        import skimage  # noqa: F401
    except ImportError:
        raise ImportError("sgz eval needs the eval extra: pip install -e '.[eval]'") from None


def evaluate(
    checkpoint,
    low: Path,
    high: Path | None = None,
    device=None,
    save: str | None = None,
    strength: float = 1.0,
    denoise: float = DENOISE,
    exposure="auto",
) -> dict:
    """Scores of `Enhancer.enhance(image, strength, denoise=..., exposure=...)` per image and
    their means (denoise=0, exposure=None: the network alone)."""
    _require_scoring()
    enhancer = load_model(checkpoint, device=device)
    files = list_images(low)
    rows = []
    for f in files:
        img = decode_image(f.read_bytes())
        t = time.perf_counter()
        out = tensor_to_rgb(
            enhancer.enhance(img.to_tensor(), strength, denoise=denoise, exposure=exposure)
        )
        row = {
            "image": f.name,
            "ms": round((time.perf_counter() - t) * 1000, 1),
            "brightness": round(float(out.mean()) / 255, 4),
        }
        if high is not None:
            gt_file = high / f.name
            if not gt_file.is_file():
                raise FileNotFoundError(f"no ground truth {gt_file} for {f.name}")
            gt = decode_image(gt_file.read_bytes()).rgb
            row.update(
                psnr=psnr(out, gt),
                ssim=ssim(out, gt),
                gt_mean_psnr=gt_mean_psnr(out, gt),
                channel_gt_mean_psnr=channel_gt_mean_psnr(out, gt),
            )
        else:
            row["piqe"] = piqe(out)
        if save:
            Path(save).mkdir(parents=True, exist_ok=True)
            (Path(save) / f"{f.stem}.png").write_bytes(encode_image(out, None, False, "PNG"))
        rows.append(row)
    keys = [k for k in rows[0] if k not in ("image", "ms")]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {
        "checkpoint": str(checkpoint or "default"),
        "sha256": enhancer.sha256[:16],
        "strength": strength,
        "denoise": denoise,
        "exposure": exposure,
        "low": str(low),
        "high": str(high) if high else None,
        "images": len(rows),
        "summary": summary,
        "rows": rows,
    }


def format_report(report: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(report, indent=2)
    lines = []
    keys = list(report["summary"])
    if report.get("rows"):
        lines.append("  ".join(["image".ljust(16)] + [k.rjust(12) for k in keys]))
        for r in report["rows"]:
            lines.append("  ".join([r["image"][:16].ljust(16)] + [f"{r[k]:12.4f}" for k in keys]))
    lines.append(
        f"{report['images']} images, checkpoint {report['checkpoint']} ({report['sha256']})"
    )
    lines.append("  ".join(f"{k} {v:.4f}" for k, v in report["summary"].items()))
    return "\n".join(lines)
