"""Image decoding: a PNG, JPEG or DICOM file in, an 8-bit grayscale PIL image out, or a clear refusal."""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.films.dicom import read_dicom
from core.films.errors import DEFAULT_MAX_FILE_BYTES, MIN_SIDE, ImageRejected, over_limit

DEFAULT_MAX_PIXELS = 50_000_000
# Films come as PNG or JPEG (or DICOM, told by its preamble); every other Pillow plugin is attack surface only.
RASTER_FORMATS = ("PNG", "JPEG")
NOT_A_FILM = "not a PNG, JPEG or DICOM file"

# Pillow's process-wide switch would pad a cut-off file with black and call it decoded; a partial film must
# never be scored. Nothing in Chest-Aid turns it on; PNGs are checked against their header regardless.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def read_bounded(path: str | Path, *, max_bytes: int) -> bytes:
    """Reads a whole file only if it is at most max_bytes long; a larger (or growing) file is refused unread."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise ImageRejected(over_limit(size, max_bytes))
        # Reading one byte past the cap catches a file that grew after the size check.
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageRejected(f"file grew past the limit of {max_bytes:,} bytes while being read")
    return data


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit grayscale, keeping 16-bit precision until the last step."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNGs use the full 0..65535 range; dividing by 257 maps an 8-bit image stored
        # as 16 bits (v*257) back to exactly the same 8-bit values. rint(v / 257) in integers: v = 257k + r,
        # r ≤ 256, is never halfway, so it is (v + 128) // 257, the same bytes as in float64 at half the CPU or
        # less (a 2500×2048 16-bit PNG: the conversion alone took about 60 ms of a 118 ms decode).
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry no film; composite on black, the radiograph background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return img.convert("RGB").convert("L")


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel (PNG spec, IHDR)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_size(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes the IDAT stream must inflate to: each row (of each Adam7 pass) is a filter byte plus packed samples."""
    bits = bit_depth * _PNG_CHANNELS[colour_type]

    def rows(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w and h else 0
    if not interlaced:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)


def _check_png_complete(data: bytes) -> None:
    """Refuses a PNG whose IDAT data inflates to less than its header's image needs (a cut-off film)."""
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, bit_depth, colour_type, _, _, interlace = header
    expected = _png_raw_size(width, height, bit_depth, colour_type, interlace == 1)
    # Inflate in bounded steps and keep only the count: the decoded image already holds the pixels.
    inflater, pending, total = zlib.decompressobj(), b"".join(idat), 0
    while total < expected and not inflater.eof:
        out = inflater.decompress(pending, 1 << 20)
        pending = inflater.unconsumed_tail
        if not out:
            break
        total += len(out)
    if total < expected:
        raise ImageRejected(f"truncated or corrupt image data: PNG pixel data is incomplete "
                            f"({total:,} of {expected:,} bytes)")


def _last_row_written(img: Image.Image) -> bool:
    """Tells whether a decoded non-interlaced PNG's last row holds data, which proves every row was there.

    Pillow decodes such a PNG row after row, each row only once all its bytes are inflated, into an image that
    starts all zero; a non-zero pixel in the last row means the pixel data reached its end, and the second
    inflation of _check_png_complete (18 of 42 ms of CPU for a 2500×2048 PNG, 2-core AMD EPYC family 25 model 17)
    is not needed. A last row of zeros, or an interlaced file, still gets the full check.
    """
    if img.info.get("interlace"):
        return False
    extrema = img.crop((0, img.height - 1, img.width, img.height)).getextrema()
    return any(high for _, high in (extrema if isinstance(extrema[0], tuple) else (extrema,)))


def _decode_raster(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes a PNG or JPEG; every failure, whatever the decoder raised, becomes an ImageRejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
                )
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                raise ImageRejected("multi-frame images are not supported")
            if img.format == "PNG" and not _last_row_written(img):
                _check_png_complete(data)
            img = ImageOps.exif_transpose(img)
            if min(img.size) < MIN_SIDE:
                raise ImageRejected(
                    f"image is {img.size[0]}x{img.size[1]} pixels; films under {MIN_SIDE} px are not scored")
            return _to_8bit_gray(img)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected(NOT_A_FILM) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"image too large to decode safely: {exc}") from exc
    except MemoryError as exc:
        raise ImageRejected("image too large to decode in memory") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"truncated or corrupt image data: {str(exc)[:200]}") from exc
    except Exception as exc:  # decoders raise TypeError, IndexError, KeyError, struct.error… on hostile bytes
        raise ImageRejected(f"truncated or corrupt image data ({type(exc).__name__}: {str(exc)[:200]})") from exc


def load_grayscale(source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_bytes: int = DEFAULT_MAX_FILE_BYTES, guard: bool = True) -> Image.Image:
    """Decodes a PNG, a JPEG or a DICOM file (by its preamble) to an oriented 8-bit grayscale image.

    A file over max_bytes is refused before it is read. guard=False decodes a DICOM film the guard refuses
    (a lateral, say) for display only, never for scoring.
    """
    data = read_bounded(source, max_bytes=max_bytes) if isinstance(source, (str, Path)) else source
    if len(data) > max_bytes:
        raise ImageRejected(over_limit(len(data), max_bytes))
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    if data[128:132] == b"DICM":
        return read_dicom(data, max_pixels=max_pixels, max_bytes=max_bytes, guard=guard)[0]
    return _decode_raster(data, max_pixels)
