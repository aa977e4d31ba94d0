"""core.films.imaging on real fixture films and on the bad inputs a folder of scanner output really contains."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.films.errors import ImageRejected
from core.films.imaging import load_grayscale
from tests.conftest import fixture_images


def film() -> tuple[bytes, np.ndarray]:
    """Returns a fixture JPEG's bytes and its decoded 8-bit pixels."""
    path = fixture_images()[0]
    with Image.open(path) as img:
        assert img.mode == "L"
        return path.read_bytes(), np.asarray(img).copy()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width×height, with a few bytes of data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def rejection(data: bytes, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        load_grayscale(data, **kw)
    return str(info.value)


def test_8bit_jpeg_decodes_to_its_own_pixels():
    data, pixels = film()
    img = load_grayscale(data)
    assert img.mode == "L"
    assert np.array_equal(np.asarray(img), pixels)


def test_path_and_bytes_give_the_same_image():
    path = fixture_images()[3]
    assert np.array_equal(np.asarray(load_grayscale(path)), np.asarray(load_grayscale(path.read_bytes())))


def test_16bit_png_of_v_times_257_equals_the_8bit_film():
    _, pixels = film()
    wide = Image.fromarray(pixels.astype(np.uint16) * 257)
    data = png(wide)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")  # really stored as 16 bits per pixel
        assert int(np.asarray(check).max()) == int(pixels.max()) * 257
    assert np.array_equal(np.asarray(load_grayscale(data)), pixels)


def test_rgba_png_opaque_gray_equals_film_and_transparent_is_black():
    _, pixels = film()
    rgba = np.stack([pixels, pixels, pixels, np.full_like(pixels, 255)], axis=-1)
    assert np.array_equal(np.asarray(load_grayscale(png(Image.fromarray(rgba, "RGBA")))), pixels)
    rgba[:, : pixels.shape[1] // 2, 3] = 0  # left half fully transparent
    out = np.asarray(load_grayscale(png(Image.fromarray(rgba, "RGBA"))))
    assert (out[:, : pixels.shape[1] // 2] == 0).all()
    assert np.array_equal(out[:, pixels.shape[1] // 2:], pixels[:, pixels.shape[1] // 2:])


def test_palette_png_is_looked_up_through_its_palette():
    _, pixels = film()
    img = Image.fromarray(pixels, "P")
    # An inverted gray palette: index i shows as 255 - i, so decoding must apply the palette.
    img.putpalette([c for i in range(256) for c in (255 - i,) * 3])
    data = png(img)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
    assert np.array_equal(np.asarray(load_grayscale(data)), 255 - pixels)


def test_exif_orientation_6_is_rotated_upright():
    _, pixels = film()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display needs 90° clockwise
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as raw:
        stored = np.asarray(raw).copy()
    out = np.asarray(load_grayscale(data))
    assert out.shape == (stored.shape[1], stored.shape[0])
    assert np.array_equal(out, np.rot90(stored, k=-1))


def test_zero_byte_file():
    assert rejection(b"") == "empty file (0 bytes)"


def test_truncated_jpeg():
    data, _ = film()
    reason = rejection(data[: len(data) // 2])
    assert reason.startswith("truncated or corrupt image data: image file is truncated")


def test_text_file_named_png():
    assert rejection(b"patient list\nnot an image\n") == "not a PNG, JPEG or DICOM file"


def test_image_over_the_configured_pixel_limit():
    data = png(Image.new("L", (300, 300)))
    assert rejection(data, max_pixels=10_000) == "image is 300x300 = 90,000 pixels, over the limit of 10,000"
    assert load_grayscale(data, max_pixels=90_000).size == (300, 300)


def test_decompression_bomb_header_is_refused_before_decoding():
    # 8000×8000 claims 64 M pixels in 90 bytes: refused by our limit without allocating the image.
    assert rejection(png_header_only(8000, 8000)) == (
        "image is 8000x8000 = 64,000,000 pixels, over the limit of 50,000,000")
    # 10^10 pixels trips Pillow's own bomb guard already while opening.
    assert rejection(png_header_only(100_000, 100_000)) == (
        "image too large to decode safely: Image size (10000000000 pixels) exceeds limit of 178956970 pixels, "
        "could be decompression bomb DOS attack.")


def test_tiny_image():
    assert rejection(png(Image.new("L", (50, 40), 128))) == "image is 50x40 pixels; films under 64 px are not scored"
    assert load_grayscale(png(Image.new("L", (64, 64), 128))).size == (64, 64)


def test_every_16_bit_value_maps_to_the_rounded_257th_and_out_of_range_values_clip():
    from core.films.imaging import _to_8bit_gray

    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(np.rint(every / 257.0), 0, 255).astype(np.uint8)  # the float64 formula, value by value
    for mode_image in (Image.fromarray(every), Image.fromarray(every.byteswap().view(">u2"))):
        assert mode_image.mode.startswith("I;16")
        assert np.array_equal(np.asarray(_to_8bit_gray(mode_image)), expected)
    wide = np.array([[-70000, -1, 0, 128, 129, 385, 386, 65535, 65536, 10**9]], dtype=np.int32)
    out = np.asarray(_to_8bit_gray(Image.fromarray(wide)))
    assert Image.fromarray(wide).mode == "I" and out.tolist() == [[0, 0, 0, 0, 1, 1, 2, 255, 255, 255]]
    floats = np.array([[-3.0, 0.4, 0.5, 1.5, 254.6, 300.0]], dtype=np.float32)
    assert np.asarray(_to_8bit_gray(Image.fromarray(floats))).tolist() == [[0, 0, 0, 2, 255, 255]]
