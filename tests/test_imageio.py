"""model.imageio: every kind of input Pillow reads becomes 8-bit RGB (+ alpha), written back in a
sensible mode; bad bytes give specific errors. Inputs are derived from real sice-real photos."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import SICE
from PIL import Image

from model import imageio, png
from model.imageio import (
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    encode_image,
    factor_to_picture,
    output_format,
    tensor_to_rgb,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real 160x96 RGB photo piece (not square, so a rotation shows in the size)."""
    return Image.open(SICE / "761_0_.png").convert("RGB").crop((100, 200, 260, 296))


def as_bytes(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def reopen(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_rgb_png_is_exact(photo):
    image = decode_image(as_bytes(photo))
    assert np.array_equal(image.rgb, np.asarray(photo))
    assert (image.alpha, image.gray, image.format, image.size) == (None, False, "PNG", (160, 96))
    t = image.to_tensor()
    assert t.shape == (1, 3, 96, 160) and t.dtype == torch.uint8
    assert reopen(encode_image(image.rgb, None, False, "PNG")).mode == "RGB"


def test_grayscale_becomes_rgb_and_is_written_back_as_l(photo):
    gray = photo.convert("L")
    image = decode_image(as_bytes(gray))
    assert image.gray and image.alpha is None
    for c in range(3):
        assert np.array_equal(image.rgb[:, :, c], np.asarray(gray))
    out = reopen(encode_image(image.rgb, image.alpha, image.gray, "PNG"))
    assert out.mode == "L" and np.array_equal(np.asarray(out), np.asarray(gray))


def test_rgba_alpha_is_kept_untouched(photo):
    alpha = np.tile(np.linspace(0, 255, 160).astype(np.uint8), (96, 1))
    alpha[10:20, 10:20] = 0
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(alpha))
    image = decode_image(as_bytes(rgba))
    assert np.array_equal(image.alpha, alpha) and not image.gray
    assert np.array_equal(image.rgb, np.asarray(photo))  # colour under alpha 0 survives too
    brighter = np.clip(image.rgb.astype(int) + 40, 0, 255).astype(np.uint8)
    for fmt, mode in (("PNG", "RGBA"), ("WEBP", "RGBA"), ("JPEG", "RGB")):
        out = reopen(encode_image(brighter, image.alpha, image.gray, fmt))
        assert out.mode == mode, fmt
        if mode == "RGBA":
            assert np.array_equal(np.asarray(out.getchannel("A")), alpha), fmt


def test_gray_with_alpha_is_written_back_as_la(photo):
    la = photo.convert("LA")
    image = decode_image(as_bytes(la))
    assert image.gray and np.array_equal(image.alpha, np.asarray(la.getchannel("A")))
    assert reopen(encode_image(image.rgb, image.alpha, image.gray, "PNG")).mode == "LA"


def test_palette_without_transparency(photo):
    pal = photo.quantize(64)
    image = decode_image(as_bytes(pal))
    assert image.alpha is None and not image.gray
    assert np.array_equal(image.rgb, np.asarray(pal.convert("RGB")))


def test_palette_with_transparency_gets_an_alpha(photo):
    pal = photo.quantize(64)
    index = np.asarray(pal)
    clear = int(index[0, 0])
    image = decode_image(as_bytes(pal, transparency=clear))
    assert np.array_equal(image.alpha, np.where(index == clear, 0, 255).astype(np.uint8))
    assert 0 < (image.alpha == 0).sum() < image.alpha.size
    assert reopen(encode_image(image.rgb, image.alpha, image.gray, "PNG")).mode == "RGBA"


def test_gray_palette_counts_as_gray(photo):
    pal = photo.convert("L").convert("P")
    assert pal.mode == "P"
    image = decode_image(as_bytes(pal))
    assert image.gray
    assert np.array_equal(image.rgb[:, :, 0], np.asarray(pal.convert("L")))


def test_colour_key_transparency_on_rgb_png(photo):
    key = tuple(int(v) for v in np.asarray(photo)[0, 0])
    image = decode_image(as_bytes(photo, transparency=key))
    expected = np.where((np.asarray(photo) == key).all(axis=2), 0, 255)
    assert image.alpha is not None and np.array_equal(image.alpha, expected)


def test_exif_rotated_jpeg_is_upright(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = as_bytes(photo, "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(reopen(data).convert("RGB"))  # pixels as stored, before orientation
    image = decode_image(data)
    assert stored.shape[:2] == (96, 160)
    assert image.size == (96, 160)  # width and height swapped
    assert np.array_equal(image.rgb, np.rot90(stored, k=-1))
    assert image.format == "JPEG"


def test_sixteen_bit_png_is_scaled_not_clipped(photo):
    gray8 = np.asarray(photo.convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # full 16-bit range: 255 -> 65535
    img16 = Image.fromarray(gray16)
    data = as_bytes(img16)
    assert reopen(data).mode == "I;16"
    image = decode_image(data)
    assert image.gray
    assert np.array_equal(image.rgb[:, :, 1], gray8)  # clipping would turn most of it white
    assert image.rgb.max() <= gray8.max() and image.rgb.mean() < 128


def test_truncated_jpeg_is_a_decode_error(photo):
    data = as_bytes(photo, "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_text_and_empty_input_are_decode_errors():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"date,lux\n2024-01-01,0.3\n" * 50)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_max_pixels_is_enforced_before_decoding(photo):
    data = as_bytes(photo)
    with pytest.raises(ImageTooLarge, match="160x96 = 15360 pixels, the limit is 15359"):
        decode_image(data, max_pixels=15359)
    assert decode_image(data, max_pixels=15360).size == (160, 96)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be width x height: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused():
    bomb = _png_header_only(60_000, 60_000)
    assert len(bomb) < 100
    with pytest.raises(ImageTooLarge, match="decompression bomb|pixels"):
        decode_image(bomb)
    # between Pillow's warning and error thresholds: refused by our own check, no decoding
    with pytest.raises(ImageTooLarge, match="the limit is"):
        decode_image(_png_header_only(12_000, 10_000))


def test_output_format_names():
    assert output_format("jpeg", "PNG") == "JPEG"
    assert output_format(None, "WEBP") == "WEBP"
    assert output_format(None, "BMP") == "PNG"
    with pytest.raises(ValueError, match="unsupported output format"):
        output_format("gif", "PNG")


def test_factor_picture_darker_means_lower_factor():
    x_r = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 1, 5).expand(3, 1, 5)
    picture = factor_to_picture(x_r)
    assert picture.shape == (1, 5, 3) and picture.dtype == np.uint8
    assert picture[0, :, 0].tolist() == [0, 64, 128, 191, 255]


def test_tensor_to_rgb_is_the_channels_last_copy(photo):
    chw = decode_image(as_bytes(photo, "PNG")).to_tensor().contiguous()
    want = chw[0].permute(1, 2, 0).numpy()
    assert np.array_equal(tensor_to_rgb(chw), want)  # (1, 3, H, W)
    assert np.array_equal(tensor_to_rgb(chw[0]), want)  # (3, H, W)


def test_to_tensor_and_back_share_the_decoded_pixels(photo):
    image = decode_image(as_bytes(photo, "PNG"))
    t = image.to_tensor()
    assert t.shape == (1, 3, 96, 160) and t.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(t[0, 1].numpy(), image.rgb[:, :, 1])
    rgb = tensor_to_rgb(t)
    assert np.shares_memory(rgb, image.rgb) and np.array_equal(rgb, image.rgb)


def jpegs() -> list[bytes]:
    """Real photos as JPEG: baseline and progressive, 4:2:0 and 4:4:4, odd sizes."""
    out = []
    for i, f in enumerate(sorted(SICE.glob("*.png"))[:4]):
        img = Image.open(f).convert("RGB").crop((0, 0, 301 + 2 * i, 203 + i))
        out.append(
            as_bytes(
                img, "JPEG", quality=90, progressive=bool(i % 2), subsampling=0 if i >= 2 else 2
            )
        )
    return out


@pytest.mark.skipif(imageio.simplejpeg is None, reason="simplejpeg not installed")
def test_jpeg_decodes_to_exactly_pillows_pixels():
    for data in jpegs():
        image = decode_image(data)
        assert np.array_equal(image.rgb, np.asarray(reopen(data).convert("RGB")))
        assert image.format == "JPEG" and not image.gray and image.alpha is None


@pytest.mark.skipif(imageio.simplejpeg is None, reason="simplejpeg not installed")
def test_jpeg_encodes_like_pillow(photo):
    """Same quality and chroma subsampling as Pillow's encoder: a round trip lands as close to
    the original as Pillow's does, and in a file of about the same size."""
    rgb = np.asarray(photo).copy()
    ours = encode_image(rgb, None, False, "JPEG", 90)
    pillow = as_bytes(photo, "JPEG", quality=90)
    err = [np.abs(np.asarray(reopen(d), np.int16) - rgb).mean() for d in (ours, pillow)]
    assert reopen(ours).size == photo.size and reopen(ours).mode == "RGB"
    assert abs(err[0] - err[1]) < 0.1 * err[1]
    assert abs(len(ours) - len(pillow)) < 0.05 * len(pillow)


# --- the fast PNG reader and writer (model/png.py) --------------------------------------------


def pillow_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("shape", [(900, 1200, 3), (7, 5, 4), (1, 1, 3), (33, 17), (20, 9, 2)])
def test_png_writer_is_lossless_and_standard(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    data = png.encode_png(pixels)
    back = pillow_pixels(data)  # Pillow checks every chunk's CRC while reading
    assert np.array_equal(back.reshape(pixels.shape), pixels)
    channels = 1 if len(shape) == 2 else shape[2]
    assert Image.open(io.BytesIO(data)).mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]


def test_png_writer_splits_large_data_into_idat_chunks():
    pixels = np.random.default_rng(1).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    data = png.encode_png(pixels)  # noise does not compress: ~5.8 MB, two IDAT chunks
    assert data.count(b"IDAT") >= 2
    assert np.array_equal(pillow_pixels(data), pixels)


def test_png_writer_refuses_what_png_cannot_hold():
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ValueError, match="1-4"):
        png.encode_png(np.zeros((4, 4, 5), np.uint8))


def test_png_writer_compresses_photos_like_pillow(photo):
    rgb = np.asarray(photo.convert("RGB"))
    ours, pillows = len(png.encode_png(rgb)), len(as_bytes(photo.convert("RGB"), compress_level=1))
    assert ours < 1.15 * pillows


@pytest.mark.skipif(png.imagecodecs is None, reason="imagecodecs not installed")
def test_png_reader_gives_pillows_pixels_for_every_shared_photo():
    files = sorted(SICE.glob("*.png"))
    assert files
    for f in files:
        data = f.read_bytes()
        fast = png.decode_png(data)
        with Image.open(f) as im:
            if im.mode not in ("RGB", "RGBA"):
                continue
            assert fast is not None, f.name
            assert np.array_equal(fast, np.asarray(im)), f.name


@pytest.mark.skipif(png.imagecodecs is None, reason="imagecodecs not installed")
def test_png_reader_leaves_the_unusual_to_pillow(photo):
    rgb = photo.convert("RGB")
    assert png.decode_png(as_bytes(rgb.convert("P"))) is None  # palette
    assert png.decode_png(as_bytes(rgb, transparency=(0, 0, 0))) is None  # colour key
    exif = Image.Exif()
    exif[imageio.ORIENTATION] = 6
    assert png.decode_png(as_bytes(rgb, exif=exif)) is None
    truncated = as_bytes(rgb)[:5000]
    assert png.decode_png(truncated) is None
    with pytest.raises(ImageDecodeError):
        decode_image(truncated)


def test_png_in_png_out_round_trip_through_decode_and_encode(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(
        Image.fromarray(
            np.arange(rgba.width * rgba.height, dtype=np.uint8).reshape(rgba.height, rgba.width)
        )
    )
    decoded = decode_image(as_bytes(rgba))
    assert decoded.rgb.flags.c_contiguous
    out = Image.open(io.BytesIO(encode_image(decoded.rgb, decoded.alpha, False, "PNG")))
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out), np.asarray(rgba))


def test_webp_answer_is_a_webp(photo):
    data = encode_image(np.asarray(photo.convert("RGB")), None, False, "WEBP")
    assert Image.open(io.BytesIO(data)).format == "WEBP"
