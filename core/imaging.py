"""Image decoding: any supported file in, an 8-bit grayscale PIL image out, or a clear refusal."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 64
DEFAULT_MAX_PIXELS = 50_000_000


class ImageRejected(ValueError):
    """Raised when a file cannot be scored; the message is shown to users as the failure reason."""


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit grayscale, keeping 16-bit precision until the last step."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNGs use the full 0..65535 range; dividing by 257 maps an 8-bit image stored
        # as 16 bits (v*257) back to exactly the same 8-bit values.
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode != "F" else 1.0
        arr = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry no film; composite on black, the radiograph background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return img.convert("RGB").convert("L")


def load_grayscale(source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   guard: bool = True) -> Image.Image:
    """Decodes a PNG/JPEG/other raster or a DICOM file (by its preamble) to an oriented 8-bit grayscale image.

    guard=False decodes a DICOM film the guard refuses (a lateral, say) for display only, never for scoring.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    if data[128:132] == b"DICM":
        from core.dicom import read_dicom  # imported here: core.dicom imports ImageRejected from this module

        return read_dicom(data, max_pixels=max_pixels, guard=guard)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
                )
            img.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageRejected("not a recognised image file") from exc
        raise ImageRejected(f"image too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"truncated or corrupt image data: {exc}") from exc
    if getattr(img, "n_frames", 1) > 1:
        raise ImageRejected("multi-frame images are not supported")
    img = ImageOps.exif_transpose(img)
    if min(img.size) < MIN_SIDE:
        raise ImageRejected(f"image is {img.size[0]}x{img.size[1]} pixels; films under {MIN_SIDE} px are not scored")
    return _to_8bit_gray(img)
