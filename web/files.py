"""Films and heat-maps for the browser, found by study id: paths come only from the database."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from core.films.errors import ImageRejected
from core.films.imaging import load_grayscale
from core.ml.gradcam import upsample_cam
from core.models import Status, Study
from core.settings import Settings


class NotServable(Exception):
    """Raised when a study has no file that may be shown; the message says why."""

    def __init__(self, message: str, status_code: int = 404):
        super().__init__(message)
        self.status_code = status_code


def resolve_data_path(settings: Settings, relative: str | None) -> Path:
    """Resolves a data-dir-relative path from a DB column and refuses anything outside the data dir."""
    if not relative:
        raise NotServable("no file recorded")
    root = settings.data_dir.resolve()
    path = (root / relative).resolve()
    # A tampered or legacy row must not turn into a read of an arbitrary file (../, absolute paths, links).
    if not path.is_relative_to(root) or path == root:
        raise NotServable("recorded file lies outside the data directory")
    if not path.is_file():
        raise NotServable("file is missing from the data directory")
    return path


def encode_png(img: Image.Image) -> bytes:
    """Encodes an image as PNG, favouring speed over size (films are viewed, not stored, this way)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def film_png(settings: Settings, study: Study) -> bytes:
    """Decodes the archived film with the scoring decoder (any supported format) and returns a PNG."""
    if study.status == Status.FAILED:
        # Quarantined bytes are untrusted and, by definition, not decodable as a film.
        raise NotServable(f"study {study.id} failed: {study.error}")
    path = resolve_data_path(settings, study.stored_path)
    try:
        # A refused film (a lateral, say) is shown for reference; it is never scored. A file over
        # max_file_bytes is refused before it is read, and any decoder failure is an ImageRejected.
        return encode_png(load_grayscale(path, max_pixels=settings.max_image_pixels,
                                         max_bytes=settings.max_file_bytes, guard=study.status != Status.REFUSED))
    except ImageRejected as exc:
        raise NotServable(f"film cannot be displayed: {exc}", status_code=422) from exc
    except OSError as exc:  # unreadable archive file (permissions, I/O error): a clear answer, not a 500
        raise NotServable(f"film cannot be read from the archive: {exc.strerror or type(exc).__name__}",
                          status_code=404) from exc


def _jet(values: np.ndarray) -> np.ndarray:
    """Maps 0..1 to the jet colour ramp (blue → cyan → yellow → red), the usual Grad-CAM rendering."""
    v = values[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks at 3/4, 1/2, 1/4 of the range
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def heatmap_rgba_png(settings: Settings, study: Study) -> bytes:
    """Colourises the stored 0..1 Grad-CAM map, upsampled to the film's heat-map size (core.ml.gradcam), into an
    RGBA PNG whose opacity rises with attention.

    Cold regions become transparent so the film stays readable; the page's slider scales the rest.
    """
    if study.status != Status.SCORED:
        raise NotServable(f"study {study.id} has no heat-map (status {study.status})")
    path = resolve_data_path(settings, study.heatmap_path)
    if path.stat().st_size > settings.max_file_bytes:
        raise NotServable("heat-map is larger than the file size limit", status_code=422)
    try:
        with Image.open(path, formats=["PNG"]) as img:
            if img.width * img.height > settings.max_image_pixels:
                raise NotServable("heat-map is larger than the pixel limit", status_code=422)
            values = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        if study.width and study.height:
            values = upsample_cam(values, (study.width, study.height))
    except NotServable:
        raise
    except Exception as exc:  # a damaged heat-map file: say so rather than fail the page with a 500
        raise NotServable(f"heat-map cannot be displayed ({type(exc).__name__})", status_code=422) from exc
    rgba = np.empty(values.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = np.rint(_jet(values) * 255)
    rgba[..., 3] = np.rint(np.clip(values * 1.25, 0.0, 1.0) * 255)
    return encode_png(Image.fromarray(rgba))
