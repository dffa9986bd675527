"""What the HTTP benchmark sends: a case is a format (JPEG or PNG, answered in the same format)
and a set of photos (the shared ones as they are, or all of them at one size), plus its coding
floor, the time a server cannot avoid per image: decode + encode on one core and the model step.

    jpeg:1200x900   the sice-real photos cropped and resized to 1200x900, as JPEG q90
    png:1920x1080   ... to 1920x1080, as PNG (Pillow's default compression, as most tools write)
    jpeg:mixed      the photos as they are, up to 1920x1080 (also small, all)
"""

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from PIL import Image, ImageOps

from model.enhancer import parse_exposure
from model.imageio import decode_image, encode_image, output_format
from service.inference import stack

PHOTO_SETS = {"small": 512 * 512, "mixed": 1920 * 1080, "all": None}  # most pixels per photo
FORMATS = {"jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}
JPEG_QUALITY = 90
SIZED_PHOTOS = 12  # photos per fixed-size case: enough content variety, quick to write


@dataclass(frozen=True)
class Case:
    fmt: str  # jpeg | png: sent in, and answered in
    photos: str  # small | mixed | all | WxH

    @property
    def name(self) -> str:
        return f"{self.fmt}:{self.photos}"

    @property
    def size(self) -> tuple[int, int] | None:
        if self.photos in PHOTO_SETS:
            return None
        w, h = self.photos.split("x")
        return int(w), int(h)


def parse_cases(text: str) -> list[Case]:
    """'jpeg:1200x900,png:mixed' -> cases; ValueError with the reason otherwise."""
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        fmt, _, photos = item.lower().partition(":")
        if fmt not in FORMATS:
            raise ValueError(f"{item!r}: format must be one of {', '.join(FORMATS)}")
        case = Case(fmt, photos or "mixed")
        if case.photos not in PHOTO_SETS:
            try:
                w, h = case.size
            except ValueError:
                raise ValueError(
                    f"{item!r}: photos must be WxH or one of {', '.join(PHOTO_SETS)}"
                ) from None
            if not (16 <= w <= 8192 and 16 <= h <= 8192):
                raise ValueError(f"{item!r}: sizes from 16 to 8192 pixels a side")
        cases.append(case)
    if not cases:
        raise ValueError("no HTTP case given")
    return cases


def enhance_kwargs(query: str) -> dict:
    """'denoise=0&exposure=model' -> enhance()'s keyword arguments, the same work sgz serve
    does for that query: what the baselines are started with (ValueError when unknown)."""
    kwargs = {}
    for key, value in parse_qsl(query, strict_parsing=bool(query)):
        if key in ("denoise", "strength"):
            kwargs[key] = float(value)
        elif key == "exposure":
            kwargs[key] = parse_exposure(value)
        else:
            raise ValueError(f"query {key!r}: the bench sends only denoise, exposure, strength")
    return kwargs


def write_case(shared: Path, case: Case, folder: Path) -> list[str]:
    """The case's files in `folder`; returns their descriptions."""
    pil_format, suffix = FORMATS[case.fmt]
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((shared / "data" / "sice-real").glob("*.png"))
    names = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if case.size is not None:  # crop to the aspect, then resize: no distortion
                im = ImageOps.fit(im, case.size, Image.Resampling.LANCZOS)
            elif PHOTO_SETS[case.photos] and im.width * im.height > PHOTO_SETS[case.photos]:
                continue
            params = {"quality": JPEG_QUALITY} if pil_format == "JPEG" else {}
            im.save(folder / f"{f.stem}{suffix}", pil_format, **params)
            names.append(f"{f.stem} {im.width}x{im.height}")
        if case.size is not None and len(names) == SIZED_PHOTOS:
            break
    if not names:
        raise FileNotFoundError(f"no photos for {case.name} in {shared}/data/sice-real")
    return names


def coding_floor(folder: Path, enhancer, query: str = "", batch: int = 8, passes: int = 3) -> dict:
    """Per image: decode and encode on one core (median over files and passes) and the model
    step as the servers run it (enhance's defaults, all cores, batches of `batch` same-size
    images, else one by one); `ceiling_rps`: images/s if a server did nothing else."""
    data = [f.read_bytes() for f in sorted(folder.iterdir())]
    decode_ms, encode_ms, decoded = [], [], []
    for p in range(passes):
        for blob in data:
            t0 = time.perf_counter()
            d = decode_image(blob)
            t1 = time.perf_counter()
            encode_image(d.rgb, d.alpha, d.gray, output_format(None, d.format), JPEG_QUALITY)
            decode_ms.append(1000 * (t1 - t0))
            encode_ms.append(1000 * (time.perf_counter() - t1))
            if p == 0:
                decoded.append(d)
    model_ms = _model_ms(decoded, enhancer, batch, enhance_kwargs(query))
    cores = os.cpu_count() or 1
    dec, enc = statistics.median(decode_ms), statistics.median(encode_ms)
    per_image_s = (model_ms + (dec + enc) / cores) / 1000
    return {
        "decode_ms": dec,
        "encode_ms": enc,
        "model_ms": model_ms,
        "ceiling_rps": 1 / per_image_s,
        "cores": cores,
    }


def _model_ms(decoded: list, enhancer, batch: int, kwargs: dict) -> float:
    same_size = len({d.rgb.shape for d in decoded}) == 1
    if same_size:
        x = stack([d.to_tensor() for d in (decoded * batch)[:batch]])
        calls, per_call = [x] * 3, batch
    else:
        calls, per_call = [d.to_tensor() for d in decoded], 1
    enhancer.enhance(calls[0], **kwargs)  # first-call costs (numba, buffers) not counted
    times = []
    for x in calls:
        t0 = time.perf_counter()
        enhancer.enhance(x, **kwargs)
        times.append(1000 * (time.perf_counter() - t0) / per_call)
    return statistics.median(times)
