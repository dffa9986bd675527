"""Fast, standard PNG: a writer (Up filter + ISA-L deflate) and a reader (libdeflate inflate +
a vectorised unfilter, model/kernels_png.py) for the common 8-bit images, with the GIL released
in every heavy step.

Pillow's writer, even at compress_level 1, costs more than the model step, and its reader (and
libpng's) about twice ours; the choices and their measurements are in docs/performance.md
("Image coding"). Anything unusual (palette, 16-bit, interlaced, EXIF, colour-keyed, damaged) is
left to Pillow by returning None, so behaviour and error messages there are Pillow's.
"""

import zlib
from types import ModuleType

import numpy as np

from .kernels_png import LANES, unfilter

_deflate: ModuleType
imagecodecs: ModuleType | None
try:  # ISA-L's deflate: several times zlib's speed at level 1, GIL released
    from isal import isal_zlib as _deflate
except ImportError:
    _deflate = zlib
try:  # libdeflate's inflate, GIL released: ~3x zlib's, ~1.5x ISA-L's on PNG image data
    import imagecodecs
except ImportError:
    imagecodecs = None


SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, GA, RGB, RGBA)
READS = {(8, 0): 1, (8, 4): 2, (8, 2): 3, (8, 6): 4}  # (bit depth, colour type) -> channels
UP = 2  # PNG filter type 2: each byte minus the byte above it
IDAT_BYTES = 1 << 22  # split image data into 4 MiB chunks (any size is legal; small is polite)


def _crc(tag: bytes, data: bytes | memoryview) -> int:
    return _deflate.crc32(data, _deflate.crc32(tag))  # ISA-L's: ~4x zlib's


def _chunk(tag: bytes, data: bytes | memoryview) -> list[bytes | memoryview]:
    """A chunk's pieces, to be joined once with the rest of the file (no copy of `data` here)."""
    return [len(data).to_bytes(4, "big"), tag, data, _crc(tag, data).to_bytes(4, "big")]


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """(H, W) or (H, W, C) uint8 with C in 1-4 -> PNG bytes, lossless.

    Every row uses the Up filter: on photos it compresses about as well as a per-row choice and is
    one vectorised subtraction (docs/performance.md, "Image coding")."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {pixels.dtype}")
    a = pixels if pixels.ndim == 3 else pixels[:, :, None]
    h, w, c = a.shape
    if c not in COLOUR_TYPES or h == 0 or w == 0:
        raise ValueError(f"encode_png needs (H, W, 1-4) pixels, got {pixels.shape}")
    flat = np.ascontiguousarray(a).reshape(h, w * c)
    rows = np.empty((h, 1 + w * c), np.uint8)  # filter byte + filtered scanline
    rows[:, 0] = UP
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG's
    data = memoryview(_deflate.compress(rows, level))
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, COLOUR_TYPES[c], 0, 0, 0])
    pieces = [SIGNATURE, *_chunk(b"IHDR", ihdr)]
    for i in range(0, len(data), IDAT_BYTES):
        pieces += _chunk(b"IDAT", data[i : i + IDAT_BYTES])
    return b"".join([*pieces, *_chunk(b"IEND", b"")])


def warmup() -> None:
    """Compile (or load from numba's disk cache) the reader's kernels now, so that the first
    PNG request does not wait for them: one full band and a partial one."""
    decode_png(encode_png(np.zeros((LANES + 1, 2, 3), np.uint8)))


def decode_png(data: bytes) -> np.ndarray | None:
    """8-bit gray, gray + alpha, RGB or RGBA, non-interlaced PNG without EXIF or colour key ->
    (H, W, 1-4) uint8. None for anything else, or anything damaged, so that Pillow decodes it
    and words the error."""
    header = _header(data)
    if header is None or imagecodecs is None:
        return None
    width, height, channels = header
    compressed = _image_data(memoryview(data))
    if compressed is None:
        return None
    size = height * (1 + width * channels)
    try:  # checks the zlib stream's Adler-32; refuses more data than the image holds
        raw = imagecodecs.deflate_decode(compressed, out=size)
        if len(raw) != size:  # less data than the image holds
            return None
        pixels = unfilter(np.frombuffer(raw, np.uint8), height, width, channels)
    except Exception:
        return None
    return pixels.reshape(height, width, channels)


def _header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels) from a valid IHDR of a PNG decode_png handles, else None."""
    if len(data) < 33 or not data.startswith(SIGNATURE) or data[8:16] != b"\0\0\0\rIHDR":
        return None
    if _crc(b"IHDR", data[16:29]) != int.from_bytes(data[29:33], "big"):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, compression, filtering, interlace = data[24:29]
    if not (0 < width < 1 << 31 and 0 < height < 1 << 31) or (depth, colour) not in READS:
        return None
    if compression or filtering or interlace:  # only method 0 exists; Adam7 left to Pillow
        return None
    return width, height, READS[depth, colour]


def _image_data(data: memoryview) -> bytes | memoryview | None:
    """The IDAT chunks' data, joined, with every chunk's bounds and IDAT's CRCs checked; None
    for a damaged file, a colour key or EXIF (Pillow's), or a critical chunk we do not know."""
    parts: list[memoryview] = []
    pos, idat_end, ended = 33, 0, False
    while pos + 12 <= len(data) and not ended:
        length = int.from_bytes(data[pos : pos + 4], "big")
        tag, body = bytes(data[pos + 4 : pos + 8]), data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            return None
        if tag == b"IDAT":
            if parts and pos != idat_end:  # IDAT chunks must be consecutive
                return None
            if _crc(tag, body) != int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big"):
                return None
            parts.append(body)
            idat_end = pos + 12 + length
        elif tag in (b"tRNS", b"eXIf") or (tag[0] < 97 and tag not in (b"PLTE", b"IEND")):
            return None  # Pillow applies those two; an unknown critical chunk: Pillow's call
        ended = tag == b"IEND"
        pos += 12 + length
    if not ended or not parts:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)
