"""DICOM pixel data: decoded by the cheapest installed decoder, then to 8-bit grayscale the way a viewer shows it
(Modality LUT, VOI LUT or window, inversion)."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder

from core.films.errors import ImageRejected


# The decoder for each compressed syntax, fastest first where several are installed (pyproject ships them all):
# CPU ms for one 2500×2048 film (12-bit; 8-bit for baseline JPEG) on one Zen 5 core (AMD EPYC family 26 model 2).
# Left to itself pydicom takes whichever installed plugin it lists first, which cost 4.7× on baseline JPEG
# (pylibjpeg 26.6 against Pillow 5.7) and 4.5× on JPEG-LS (pylibjpeg 333 against pyjpegls 74). gdcm comes last for
# JPEG 2000: it decodes in several threads (565 ms of CPU against pylibjpeg's 462 on one), which take the cores
# the forward pass runs on.
PREFERRED_PLUGINS = {
    uid.RLELossless: ("pylibjpeg", "pydicom"),  # 8 against pydicom's pure Python 50
    uid.JPEGBaseline8Bit: ("pillow", "gdcm", "pylibjpeg"),  # 5.7, 24.6, 26.6
    uid.JPEGLossless: ("gdcm", "pylibjpeg"),  # 114, 146
    uid.JPEGLosslessSV1: ("gdcm", "pylibjpeg"),  # 117, 146
    uid.JPEGLSLossless: ("pyjpegls", "gdcm", "pylibjpeg"),  # 74, 119, 333
    uid.JPEGLSNearLossless: ("pyjpegls", "gdcm", "pylibjpeg"),
    uid.JPEG2000Lossless: ("pylibjpeg", "pillow", "gdcm"),  # 462, 500, 565 in threads
    uid.JPEG2000: ("pylibjpeg", "pillow", "gdcm"),
}


def preferred_plugin(syntax: str | None) -> str | None:
    """The installed decoder decode_pixels uses first for `syntax` (PREFERRED_PLUGINS); None: pydicom's own
    order (an uncompressed syntax, or one without a preference)."""
    if not syntax or syntax not in PREFERRED_PLUGINS:
        return None
    available = get_decoder(syntax).available_plugins
    return next((name for name in PREFERRED_PLUGINS[syntax] if name in available), None)


def _pixel_array(ds: Dataset) -> np.ndarray:
    """ds.pixel_array, with a Rust decoder's panic raised as the ValueError it is about: pylibjpeg-rle panics on a
    stream that overruns its frame, and pyo3's PanicException derives from BaseException, which gets past every
    `except Exception` up to the worker."""
    try:
        return ds.pixel_array
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise ValueError(f"the decoder failed on a malformed stream: {exc}") from exc


def decode_pixels(ds: Dataset) -> np.ndarray:
    """ds.pixel_array through the preferred installed decoder for its syntax (preferred_plugin); a frame that one
    cannot read goes to every installed decoder in turn, as pydicom does by default."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    plugin = preferred_plugin(syntax)
    if plugin is not None:
        ds.pixel_array_options(decoding_plugin=plugin)
        try:
            return _pixel_array(ds)
        except Exception:
            ds.pixel_array_options()  # every installed plugin, the preferred one again included
            if get_decoder(syntax).available_plugins == (plugin,):
                raise
    return _pixel_array(ds)


def _wide_voi_lut(ds: Dataset, item: Dataset) -> Dataset:
    """Returns a dataset holding the same VOI LUT declared as 16 bits per entry (same values, same lookup).

    pydicom 3.0.2's apply_voi indexes an 8-bit LUT with a uint8 array, so every input above 255 wraps round;
    an 8-bit table of 4096 entries for 12-bit CR is common, and would be silently mis-mapped.
    """
    descriptor = item["LUTDescriptor"]
    lut = Dataset()
    lut.add_new(descriptor.tag, descriptor.VR, [*list(descriptor.value)[:2], 16])
    lut["LUTData"] = item["LUTData"]
    wide = Dataset()
    wide.file_meta = ds.file_meta
    wide.set_original_encoding(*ds.original_encoding)
    wide.VOILUTSequence = [lut]
    return wide


def _voi(values: np.ndarray, ds: Dataset, present: Callable[[np.ndarray], np.ndarray] | None = None
         ) -> tuple[np.ndarray, float, float]:
    """Applies the VOI stage; returns the output and the range it is defined on (what maps to black..white).
    `present(values)` (for a table of values, see to_8bit) tells which of them occur in the film: the range of a film
    with no VOI LUT or window is that of its own values."""
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        if not np.issubdtype(values.dtype, np.integer):
            # A float rescale output still holds integer values; the LUT indexes by integer.
            values = np.rint(values).astype(np.int64)
        entries, first, bits = (int(v) for v in sequence[0].LUTDescriptor)
        lut_ds = _wide_voi_lut(ds, sequence[0]) if bits == 8 else ds
        table = apply_voi(np.arange(first, first + (entries or 65536)), lut_ds, 0)
        # Some writers declare 16 bits per entry for a 12-bit table; scaling by 2**16 would give a near-black film.
        bits = min(bits, max(int(table.max()).bit_length(), 8))
        return apply_voi(values, lut_ds, 0).astype(np.float64), 0.0, float(2**bits - 1)
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        # The window maps onto pydicom's output range; probing it with ±inf yields exactly that range.
        lo, hi = sorted(apply_windowing(np.array([-np.inf, np.inf]), ds, 0))
        return apply_windowing(values, ds, 0), float(lo), float(hi)
    values = values.astype(np.float64)
    occurring = values if present is None else values[present(values)]
    return values, float(occurring.min()), float(occurring.max())


# Mapping each stored value a film can hold once, then looking every pixel up in that table, gives the same bytes
# as mapping every pixel (each stage maps one value at a time) for a fraction of the CPU: on a 2500×2048 12-bit
# film (2-core AMD EPYC family 25 model 17), 70 ms of a 5-megapixel decode went to the float64 stages.
TABLE_BYTES_PER_PIXEL = 2  # 8- and 16-bit stored values, every CR/DX film; wider or float pixels are mapped as they are


def to_8bit(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → Modality LUT → VOI LUT/window (else min–max) → MONOCHROME1 inversion → uint8."""
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= TABLE_BYTES_PER_PIXEL and arr.size:
        # Unsigned values index the table as they are (from 0: at most 65,536 entries); signed ones from their minimum.
        # Skipping the int32 copy of a 5-megapixel film saves more than the larger table costs.
        base = 0 if arr.dtype.kind == "u" else int(arr.min())
        index = arr if base == 0 else np.subtract(arr, base, dtype=np.int32)
        span = int(index.max()) + 1
        table = _map(np.arange(base, base + span).astype(arr.dtype), ds, partial(_present, index, span))
        return table[index]
    return _map(arr, ds, None)


def _present(index: np.ndarray, span: int, values: np.ndarray) -> np.ndarray:
    """Which table entries (stored values) occur in the film, as far as the range of `values` (the table after
    the Modality LUT) needs to know: where that stage is monotonic, the lowest and the highest stored value (two
    reductions); otherwise every value that occurs (a bincount, which copies the film to intp: 7 ms of a
    5-megapixel film on a Zen 5 core)."""
    steps = np.diff(values)
    if (steps >= 0).all() or (steps <= 0).all():
        mask = np.zeros(span, dtype=bool)
        mask[[int(index.min()), span - 1]] = True
        return mask
    return np.bincount(index.ravel(), minlength=span) > 0


def _map(arr: np.ndarray, ds: Dataset, present: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """to_8bit's stages, value by value, on the pixels themselves or on a table of values (`present`: _voi)."""
    try:
        values, lo, hi = _voi(apply_modality_lut(arr, ds), ds, present)
    except (ValueError, TypeError, NotImplementedError, IndexError, AttributeError, KeyError) as exc:
        raise ImageRejected(f"invalid Modality LUT, VOI LUT or window in the DICOM header: {exc}") from exc
    if not hi > lo:
        raise ImageRejected("unreadable pixel data: the image holds a single value")
    # MONOCHROME1 shows high values dark. The DX IOD pairs it with Presentation LUT Shape INVERSE, which names
    # that same inversion, so the two together invert once; INVERSE on MONOCHROME2 inverts as well.
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    inverted = str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1" or shape == "INVERSE"
    # Inverting before rounding keeps a MONOCHROME1 film and its MONOCHROME2 twin bit-identical.
    fraction = (hi - values) / (hi - lo) if inverted else (values - lo) / (hi - lo)
    return np.clip(np.rint(fraction * 255.0), 0, 255).astype(np.uint8)
