"""model.png's reader (libdeflate + the wavefront unfilter of model/kernels_png.py): the exact
pixels of real photos written with every PNG filter type, row by row, in every band layout;
anything damaged or unusual left to Pillow (None). The files are built here with an independent
numpy filter so that each filter type is exercised; Pillow reads every one as the reference."""

import io
import zlib

import numpy as np
import pytest
from conftest import SICE
from PIL import Image

from model import imageio, png
from model.imageio import ImageDecodeError, decode_image
from model.kernels_png import GROUP, LANES


def photo_pixels(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """A real photo resized to height x width: gray (1), gray + alpha (2), RGB (3) or RGBA (4),
    the alpha varying."""
    src = Image.open(sorted(SICE.glob("*.png"))[seed % 8]).resize((width, height))
    colour = np.asarray(src.convert("L" if channels < 3 else "RGB")).reshape(height, width, -1)
    if channels in (1, 3):
        return colour
    alpha = (np.arange(height * width) * 7 % 256).astype(np.uint8).reshape(height, width, 1)
    return np.concatenate([colour, alpha], axis=2)


def pillow_reads(data: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    return pixels.reshape(*pixels.shape[:2], -1)


def filtered(pixels: np.ndarray, types: np.ndarray) -> bytes:
    """PNG scanlines (filter byte + filtered row) with row y filtered by types[y] (0-4)."""
    h, w, bpp = pixels.shape
    x = pixels.reshape(h, w * bpp).astype(np.int32)
    up = np.vstack([np.zeros((1, w * bpp), np.int32), x[:-1]])
    left = np.hstack([np.zeros((h, bpp), np.int32), x[:, :-bpp]])
    up_left = np.hstack([np.zeros((h, bpp), np.int32), up[:, :-bpp]])
    pa, pb, pc = abs(up - up_left), abs(left - up_left), abs(left + up - 2 * up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictions = [np.zeros_like(x), left, up, (left + up) // 2, paeth]
    rows = np.stack([(x[y] - predictions[t][y]) % 256 for y, t in enumerate(types)])
    return np.hstack([types[:, None], rows]).astype(np.uint8).tobytes()


def chunk(tag: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")


def png_file(pixels: np.ndarray, types: np.ndarray, idat_parts: int = 1, extra=b"") -> bytes:
    h, w, bpp = pixels.shape
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, png.COLOUR_TYPES[bpp], 0, 0, 0])
    data = zlib.compress(filtered(pixels, types), 6)
    cuts = np.linspace(0, len(data), idat_parts + 1).astype(int)
    idat = b"".join(chunk(b"IDAT", data[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    return png.SIGNATURE + chunk(b"IHDR", ihdr) + extra + idat + chunk(b"IEND", b"")


LAYOUTS = [  # (height, width): one row, under a band, bands and a partial one, several groups
    (1, 1),
    (1, 37),
    (5, 1),
    (LANES, 16),
    (LANES + 3, 21),
    (GROUP * LANES + 5, 9),
    (2 * GROUP * LANES, 3),
]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize(("height", "width"), LAYOUTS)
def test_every_filter_type_row_by_row_gives_the_exact_pixels(height, width, channels):
    pixels = photo_pixels(height, width, channels, seed=height + width)
    rng = np.random.default_rng(height * width)
    for types in (rng.integers(0, 5, height), np.full(height, 4), np.full(height, 3)):
        data = png_file(pixels, types.astype(np.uint8))
        assert np.array_equal(pillow_reads(data), pixels)  # the file is what we meant
        assert np.array_equal(png.decode_png(data), pixels), types[:8]


def test_photo_size_paeth_and_mixed_and_split_idat():
    pixels = photo_pixels(900, 1200, 3)
    for types, parts in ((np.full(900, 4), 1), (np.arange(900) % 5, 7)):
        data = png_file(pixels, types.astype(np.uint8), idat_parts=parts)
        assert np.array_equal(png.decode_png(data), pixels)


def test_reused_buffers_do_not_leak_between_layouts():
    # 2 RGBA pixels and 14 RGB pixels give the same skewed depth: the buffers must not be shared
    small_rgba, wide_rgb = photo_pixels(40, 2, 4), photo_pixels(40, 14, 3)
    types = np.full(40, 4, np.uint8)
    for pixels in (small_rgba, wide_rgb, small_rgba, photo_pixels(7, 14, 3), wide_rgb):
        assert np.array_equal(png.decode_png(png_file(pixels, types[: len(pixels)])), pixels)


def test_pillow_written_photos_read_the_same_as_pillow():
    for f in sorted(SICE.glob("*.png"))[:6]:
        rgb = Image.open(f).convert("RGB").resize((333, 250))
        for img in (rgb, rgb.convert("RGBA"), rgb.convert("L"), rgb.convert("LA")):
            buf = io.BytesIO()
            img.save(buf, "PNG")
            assert np.array_equal(png.decode_png(buf.getvalue()), pillow_reads(buf.getvalue()))


def test_damaged_or_unusual_files_go_to_pillow():
    pixels = photo_pixels(40, 30, 3)
    types = np.full(40, 4, np.uint8)
    good = png_file(pixels, types)
    assert png.decode_png(good) is not None
    idat = good.index(b"IDAT")
    bad_crc = good[: idat + 20] + bytes([good[idat + 20] ^ 1]) + good[idat + 21 :]
    raw = filtered(pixels, types)
    ihdr_and_sig = good[: good.index(b"IDAT") - 4]
    iend = chunk(b"IEND", b"")

    def with_data(scanlines: bytes) -> bytes:
        return ihdr_and_sig + chunk(b"IDAT", zlib.compress(scanlines)) + iend

    bad_filter = with_data(bytes([5]) + raw[1:])
    short = with_data(raw[:-10])
    long = with_data(raw + b"\0" * 31)
    compressed = zlib.compress(raw)
    half = len(compressed) // 2
    apart = (  # IDAT chunks must be consecutive
        ihdr_and_sig
        + chunk(b"IDAT", compressed[:half])
        + chunk(b"tEXt", b"a\0b")
        + chunk(b"IDAT", compressed[half:])
        + iend
    )
    ihdr = good[16:29]
    interlaced = png.SIGNATURE + chunk(b"IHDR", ihdr[:12] + b"\1") + good[33:]
    sixteen_bit = png.SIGNATURE + chunk(b"IHDR", ihdr[:8] + b"\x10" + ihdr[9:]) + good[33:]
    cases = {
        "IDAT CRC": bad_crc,
        "filter type 5": bad_filter,
        "too little data": short,
        "too much data": long,
        "no IEND": good[: -len(iend)],
        "truncated": good[: len(good) // 2],
        "unknown critical chunk": png_file(pixels, types, extra=chunk(b"ABCD", b"x")),
        "colour key": png_file(pixels, types, extra=chunk(b"tRNS", b"\0\0\0\0\0\0")),
        "IDAT apart": apart,
        "interlaced": interlaced,
        "16-bit": sixteen_bit,
        "IHDR CRC": good[:29] + b"\0\0\0\0" + good[33:],
    }
    for name, data in cases.items():
        assert png.decode_png(data) is None, name
    # and Pillow words what it cannot read
    with pytest.raises(ImageDecodeError):
        decode_image(good[: len(good) // 2])


def test_ancillary_chunks_are_ignored_like_libpng():
    pixels = photo_pixels(33, 20, 4)
    extra = chunk(b"tEXt", b"Comment\0night") + chunk(b"gAMA", (45455).to_bytes(4, "big"))
    data = png_file(pixels, np.full(33, 1, np.uint8), extra=extra)
    assert np.array_equal(png.decode_png(data), pixels)
    assert np.array_equal(decode_image(data).alpha, pixels[:, :, 3])


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_decode_image_gives_what_the_pillow_route_gives(mode):
    img = Image.open(sorted(SICE.glob("*.png"))[2]).resize((97, 45)).convert("RGBA")
    img.putalpha(Image.fromarray(photo_pixels(45, 97, 2)[:, :, 1]))
    buf = io.BytesIO()
    img.convert(mode).save(buf, "PNG")
    fast = decode_image(buf.getvalue())
    slow = imageio._split_modes(Image.open(io.BytesIO(buf.getvalue())), "PNG")
    assert (fast.gray, fast.format, fast.rgb.shape) == (slow.gray, slow.format, slow.rgb.shape)
    assert np.array_equal(fast.rgb, slow.rgb) and fast.rgb.flags.c_contiguous
    assert (fast.alpha is None) == (slow.alpha is None)
    if slow.alpha is not None:
        assert np.array_equal(fast.alpha, slow.alpha)


def test_damaged_bytes_never_give_wrong_pixels():
    """Random damage to a real PNG: the reader returns Pillow's pixels or leaves it to Pillow;
    it never returns other pixels, raises or hangs."""
    pixels = photo_pixels(70, 45, 3, seed=5)
    good = png_file(pixels, (np.arange(70) % 5).astype(np.uint8), idat_parts=3)
    rng = np.random.default_rng(7)
    for _ in range(300):
        data = bytearray(good)
        if rng.random() < 0.3:
            data = data[: rng.integers(8, len(data))]
        for at in rng.integers(8, len(data), rng.integers(1, 4)):
            data[at] ^= 1 << int(rng.integers(0, 8))
        got = png.decode_png(bytes(data))
        if got is not None:
            assert np.array_equal(got.reshape(pixels.shape), pixels)
