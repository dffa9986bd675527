"""Image decoding and encoding shared by `sgz enhance` and the service.

Decoding applies EXIF orientation and turns every mode Pillow reads (grayscale, palette,
16-bit, CMYK, with or without alpha) into 8-bit RGB plus an optional alpha plane, remembering
what the source was so the output can be written back in a sensible mode.
"""

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.png import decode_png, encode_png

try:  # libjpeg-turbo straight to and from numpy, without holding the GIL (see _decode_jpeg)
    import simplejpeg
except ImportError:  # Pillow does everything, a little slower
    simplejpeg = None

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
IMAGE_SUFFIXES = set(Image.registered_extensions())  # ".png", ".jpg", ... as Pillow reads them
ORIENTATION = 0x0112  # the EXIF tag
WEBP_METHOD = 2  # libwebp's effort 0-6: 2 is ~2x faster than Pillow's 4 at the same size here
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message says what is wrong."""


class ImageTooLarge(ValueError):
    """The image has more pixels than allowed (or looks like a decompression bomb)."""


@dataclass
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8, kept untouched
    gray: bool  # the source had no colour: write back as L / LA
    format: str  # Pillow's name of the source format ("PNG", "JPEG", ...)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]  # (width, height), as Pillow

    def to_tensor(self) -> torch.Tensor:
        """(1, 3, H, W) uint8, channels-last: a view of `rgb`, no copy (the model's fast
        path reads and writes this layout directly)."""
        return torch.from_numpy(self.rgb).permute(2, 0, 1)[None]


def decode_image(data: bytes, max_pixels: int | None = None) -> DecodedImage:
    if not data:
        raise ImageDecodeError("empty input: no image bytes")
    # Pillow's own bomb guard (DecompressionBombError above 2 x MAX_IMAGE_PIXELS) plus ours at
    # MAX_IMAGE_PIXELS, checked before any pixel is decoded. No warnings.catch_warnings here:
    # it is not thread-safe, and the service and the CLI decode in worker threads.
    limits = [p for p in (max_pixels, Image.MAX_IMAGE_PIXELS) if p]
    limit = min(limits) if limits else None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if limit is not None and w * h > limit:
            raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, the limit is {limit}")
        decoded = _decode_jpeg(img, data) or _decode_png(img, data)
        if decoded is not None:
            return decoded
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not an image, or not in a format Pillow reads here "
            "(PNG, JPEG, WebP, BMP, TIFF, GIF are)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageTooLarge):
            raise
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None
    fmt = img.format or "PNG"
    try:
        # in place: without an orientation tag (most images) this copies nothing; the default
        # returned a copy of every image (~9 ms at 1920x1080)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a broken EXIF block must not cost the user the picture
        pass
    return _split_modes(img, fmt)


def _decode_jpeg(img: Image.Image, data: bytes) -> DecodedImage | None:
    """The common case, an upright colour JPEG, by simplejpeg: the same libjpeg-turbo decoder
    and settings as Pillow (identical pixels, tests/test_imageio.py), but straight into a numpy
    array and with the GIL released throughout. Pillow's route holds the GIL while it copies
    the pixels out (Image.tobytes), which stalls the service's event loop. None: let Pillow
    do it (other formats and modes, EXIF rotation, and any error, so that its messages stay)."""
    if simplejpeg is None or img.format != "JPEG" or img.mode != "RGB":
        return None
    try:
        if img.getexif().get(ORIENTATION, 1) != 1:
            return None
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:
        return None
    if rgb.shape != (img.height, img.width, 3):
        return None
    return DecodedImage(rgb=rgb, alpha=None, gray=False, format="JPEG")


def _decode_png(img: Image.Image, data: bytes) -> DecodedImage | None:
    """An 8-bit gray or colour PNG, with or without alpha, by model/png.py's reader: what
    Pillow's reader and _split_modes give (tests/test_png_reader.py), faster and with the GIL
    released. None: Pillow's turn."""
    if img.format != "PNG" or img.mode not in ("L", "LA", "RGB", "RGBA"):
        return None
    pixels = decode_png(data)
    if pixels is None or pixels.shape[:2] != (img.height, img.width):
        return None
    channels = pixels.shape[2]
    gray = channels < 3
    if gray:  # as Pillow's convert("RGB") of L: the level in every channel
        rgb = np.repeat(pixels[:, :, :1], 3, axis=2)
    else:
        rgb = pixels if channels == 3 else np.ascontiguousarray(pixels[:, :, :3])
    alpha = None if channels in (1, 3) else np.ascontiguousarray(pixels[:, :, -1])
    return DecodedImage(rgb=rgb, alpha=alpha, gray=gray, format="PNG")


def _split_modes(img: Image.Image, fmt: str) -> DecodedImage:
    mode = img.mode
    gray = mode in GRAY_MODES or (mode == "P" and _palette_is_gray(img))
    alpha = None
    # "transparency" in info: a palette or colour-key (tRNS) transparency, as good as an alpha
    keyed = mode in ("P", "L", "RGB") and "transparency" in img.info
    if mode in ("RGBA", "LA", "PA") or keyed:
        img = img.convert("RGBA") if mode != "LA" else img
        alpha = np.asarray(img.getchannel("A"), dtype=np.uint8).copy()
    if mode.startswith("I") or mode == "F":
        rgb = _high_depth_to_rgb(img)
    else:
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8).copy()
    return DecodedImage(rgb=rgb, alpha=alpha, gray=gray, format=fmt)


def _high_depth_to_rgb(img: Image.Image) -> np.ndarray:
    """16-bit / 32-bit grayscale: scale to 8 bits (Pillow's convert('L') would clip)."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if a.max() <= 1.0 else 255.0
    else:
        top = 65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0
    g = np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _palette_is_gray(img: Image.Image) -> bool:
    pal = img.getpalette() or []
    rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
    return bool(len(rgb)) and bool(
        (rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all()
    )


def tensor_to_rgb(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) uint8 tensor -> (H, W, 3) uint8 array.

    Channels-last (what `to_tensor` gives and the model returns for it): a view, no copy.
    Otherwise one plane at a time: a copy of the whole permuted view (torch or numpy) walks
    the 3-long channel axis innermost and took 10-15 ms at 1920x1080, this ~2 ms."""
    if t.dim() == 4:
        t = t[0]
    hwc = t.cpu().permute(1, 2, 0)
    if hwc.is_contiguous():
        return hwc.numpy()
    planes = t.cpu().numpy()
    rgb = np.empty((planes.shape[1], planes.shape[2], 3), np.uint8)
    for c in range(3):
        rgb[..., c] = planes[c]
    return rgb


def output_format(name: str | None, source_format: str) -> str:
    """Pillow format name for a requested `png|jpeg|webp`, or the source's when it is one of
    those (anything else, e.g. BMP or TIFF, is answered as PNG)."""
    if name is None:
        return source_format if source_format in MEDIA_TYPES else "PNG"
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise ValueError(f"unsupported output format {name!r}; use png, jpeg or webp") from None


def encode_image(
    rgb: np.ndarray, alpha: np.ndarray | None, gray: bool, fmt: str, quality: int = 90
) -> bytes:
    """Write the enhanced picture back: grayscale sources as L, alpha re-attached where the
    format can hold it (JPEG cannot: alpha is dropped there)."""
    if fmt == "JPEG" and not gray and simplejpeg is not None:
        # Pillow's JPEG encoder holds the GIL throughout, this one does not; the same
        # libjpeg-turbo, with Pillow's default 4:2:0 chroma subsampling
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(rgb), quality=quality, colorspace="RGB", colorsubsampling="420"
        )
    if fmt == "PNG":
        return encode_png(_png_pixels(rgb, alpha, gray))
    img = Image.fromarray(rgb, "RGB")
    if gray:
        img = img.convert("L")
    if alpha is not None and fmt != "JPEG":
        img.putalpha(Image.fromarray(alpha, "L"))
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=WEBP_METHOD)
    return buf.getvalue()


def _png_pixels(rgb: np.ndarray, alpha: np.ndarray | None, gray: bool) -> np.ndarray:
    """(H, W, C) for encode_png: L or RGB (gray by Pillow's own luma rule), alpha appended."""
    base = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))[:, :, None] if gray else rgb
    return base if alpha is None else np.concatenate([base, alpha[:, :, None]], axis=2)


def factor_to_picture(x_r: torch.Tensor) -> np.ndarray:
    """A factor map (3, H, W) in [-1, 1] as an RGB picture: -1 black, +1 white, so darker
    means a lower factor (paper Fig. 3)."""
    g = ((x_r.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return tensor_to_rgb(g)
