"""Fast, standard PNG: a writer (Up filter + ISA-L deflate) and a reader (libpng through
imagecodecs) for the common 8-bit images, with the GIL released in every heavy step.

Pillow's writer, even at compress_level 1, costs more than the model step, and its reader more
than libpng; the choices and their measurements are in docs/performance.md ("Image coding").
Anything unusual (palette, 16-bit, interlaced, EXIF, colour-keyed) is left to Pillow by
returning None, so behaviour there is unchanged.
"""

import zlib
from types import ModuleType

import numpy as np

_deflate: ModuleType
imagecodecs: ModuleType | None
try:  # ISA-L's deflate: several times zlib's speed at level 1, GIL released
    from isal import isal_zlib as _deflate
except ImportError:
    _deflate = zlib
try:  # libpng to numpy, GIL released (Pillow's PNG reader holds it while copying out)
    import imagecodecs
except ImportError:
    imagecodecs = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (gray, GA, RGB, RGBA)
UP = 2  # PNG filter type 2: each byte minus the byte above it
IDAT_BYTES = 1 << 22  # split image data into 4 MiB chunks (any size is legal; small is polite)


def _chunk(tag: bytes, data: bytes | memoryview) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return len(data).to_bytes(4, "big") + tag + bytes(data) + crc.to_bytes(4, "big")


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
    idat = [_chunk(b"IDAT", data[i : i + IDAT_BYTES]) for i in range(0, len(data), IDAT_BYTES)]
    return b"".join([SIGNATURE, _chunk(b"IHDR", ihdr), *idat, _chunk(b"IEND", b"")])


def decode_png(data: bytes) -> np.ndarray | None:
    """8-bit RGB or RGBA, non-interlaced PNG without EXIF -> (H, W, 3 or 4) uint8, by libpng.
    None for anything else, or on any error, so that Pillow decodes it and words the error."""
    if imagecodecs is None or len(data) < 33 or not data.startswith(SIGNATURE):
        return None
    depth, colour, interlace = data[24], data[25], data[28]  # IHDR: the first chunk, fixed place
    if data[12:16] != b"IHDR" or depth != 8 or colour not in (2, 6) or interlace != 0:
        return None
    # colour-key transparency or an orientation: Pillow's (a chance match inside the compressed
    # data only costs the slower path)
    if b"tRNS" in data or b"eXIf" in data:
        return None
    try:
        pixels = imagecodecs.png_decode(data)
    except Exception:
        return None
    expected = 3 if colour == 2 else 4
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != expected:
        return None
    return pixels
