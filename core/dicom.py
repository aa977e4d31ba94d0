"""DICOM radiographs: identity from the header, the guard, and pixels to 8-bit grayscale the way a viewer shows them."""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.valuerep import DA, TM

from core.imaging import MIN_SIDE, ImageRejected

# pydicom's read-time validation warnings quote element values (names, IDs, dates); they must never reach a log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

SCORED_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG"})
# Lateral and oblique projections: the model has only seen frontal (PA/AP) films.
NON_FRONTAL_VIEWS = {"LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral",
                     "LLO": "oblique", "RLO": "oblique"}
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class FilmRefused(ImageRejected):
    """Raised by the guard: a readable film the model was not built for (listed as refused, not quarantined)."""


def is_dicom(data: bytes) -> bool:
    """Tells a DICOM Part 10 file by its preamble, whatever its name."""
    return data[128:132] == b"DICM"


@dataclass(frozen=True)
class DicomInfo:
    """Identity and acquisition facts from one DICOM instance; identifiers are kept out of repr (logs)."""

    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    accession_number: str | None = field(default=None, repr=False)
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)  # DICOM PN form, "Family^Given^Middle"
    patient_sex: str | None = field(default=None, repr=False)
    patient_age: str | None = field(default=None, repr=False)  # DICOM AS form, e.g. "045Y"
    study_date: str | None = field(default=None, repr=False)  # YYYYMMDD
    study_time: str | None = field(default=None, repr=False)  # HHMMSS.ffffff
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "DicomInfo":
        """Reads the identity attributes present in a dataset; absent or empty ones are None."""
        def text(keyword: str) -> str | None:
            value = ds.get(keyword)
            value = str(value).strip() if value is not None else ""
            return value or None
        return cls(sop_instance_uid=text("SOPInstanceUID"), sop_class_uid=text("SOPClassUID"),
                   study_instance_uid=text("StudyInstanceUID"), series_instance_uid=text("SeriesInstanceUID"),
                   accession_number=text("AccessionNumber"), patient_id=text("PatientID"),
                   patient_name=text("PatientName"), patient_sex=text("PatientSex"),
                   patient_age=text("PatientAge"), study_date=text("StudyDate"), study_time=text("StudyTime"),
                   modality=_upper(text("Modality")), body_part_examined=_upper(text("BodyPartExamined")),
                   view_position=_upper(text("ViewPosition")))

    def to_dict(self) -> dict[str, str | None]:
        """Returns the fields as a JSON-ready dict (keys are the attribute names)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DicomInfo":
        """Rebuilds the info from to_dict() output, ignoring unknown keys."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def study_datetime(self) -> datetime | None:
        """Returns StudyDate (+ StudyTime when present) as a naive datetime, or None if absent or malformed."""
        try:
            day = DA(self.study_date) if self.study_date else None
            clock = TM(self.study_time) if self.study_time else None
        except ValueError:
            return None
        if not isinstance(day, date):
            return None
        return datetime.combine(day, clock if isinstance(clock, time) else time())

    def refusal(self) -> str | None:
        """Returns why this film must not be scored (the guard), or None when it may be."""
        if self.modality not in SCORED_MODALITIES:
            shown = self.modality or "missing"
            return f"modality {shown} is not scored: the model reads CR/DX chest radiographs only"
        if self.body_part_examined and self.body_part_examined not in CHEST_BODY_PARTS:
            return f"body part {self.body_part_examined} is not chest: the model reads chest radiographs only"
        if self.view_position in NON_FRONTAL_VIEWS:
            kind = NON_FRONTAL_VIEWS[self.view_position]
            return f"{kind} view (ViewPosition {self.view_position}): the model reads frontal (PA/AP) films only"
        return None


def _upper(value: str | None) -> str | None:
    return value.upper() if value else None


def _parse(stream: BinaryIO, *, header_only: bool) -> Dataset:
    head = stream.read(132)
    if not head:
        raise ImageRejected("empty file (0 bytes)")
    if not is_dicom(head):
        raise ImageRejected("not a DICOM file (no DICM preamble)")
    stream.seek(0)
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=header_only)
        uid_present = bool(str(ds.get("SOPInstanceUID") or "").strip())
    except InvalidDicomError as exc:
        raise ImageRejected(f"unreadable DICOM header: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on malformed input; its messages may quote values (PHI)
        raise ImageRejected(f"unreadable DICOM header ({type(exc).__name__})") from exc
    if not uid_present:
        # pydicom reads garbage, or a file cut inside encapsulated pixel data, as an empty or near-empty dataset.
        raise ImageRejected("unreadable DICOM header: truncated or corrupt (no SOP Instance UID)")
    return ds


def _info(ds: Dataset) -> DicomInfo:
    try:
        return DicomInfo.from_dataset(ds)
    except Exception as exc:  # values are decoded lazily (character sets, VRs); messages may quote them
        raise ImageRejected(f"unreadable DICOM header ({type(exc).__name__})") from exc


def read_dicom_info(source: bytes | str | Path) -> DicomInfo:
    """Reads identity from the header only (a file's pixel data is not even read), for ingest to record quickly."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            return _info(_parse(fh, header_only=True))
    return _info(_parse(io.BytesIO(source), header_only=True))


def header_identity(path: Path) -> tuple[DicomInfo | None, str | None]:
    """For ingest: (identity, None) for a usable DICOM header, (None, reason) for an unusable one, (None, None)
    for a file that is not DICOM at all."""
    with open(path, "rb") as fh:
        if not is_dicom(fh.read(132)):
            return None, None
    try:
        info = read_dicom_info(path)
    except ImageRejected as exc:
        return None, str(exc)
    for keyword in ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid"):
        value = getattr(info, keyword) or ""
        if len(value) > 64:  # DICOM's limit; a clipped UID could merge distinct instances or studies
            return None, f"unreadable DICOM header: {keyword} is {len(value)} characters, over the 64 allowed"
    return info, None


def _check_pixel_module(ds: Dataset, max_pixels: int) -> None:
    """Refuses what the pipeline cannot score before any pixel data is decoded."""
    if "PixelData" not in ds:
        raise ImageRejected("unreadable pixel data: the DICOM file has no Pixel Data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageRejected(f"multi-frame DICOM ({frames} frames) is not supported; send single-frame radiographs")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if int(ds.get("SamplesPerPixel") or 1) != 1 or photometric not in GRAYSCALE:
        raise ImageRejected(f"colour DICOM ({photometric or 'no PhotometricInterpretation'}) is not supported; "
                            "radiographs must be MONOCHROME1 or MONOCHROME2")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols > max_pixels:
        raise ImageRejected(f"image is {cols}x{rows} = {rows * cols:,} pixels, over the limit of {max_pixels:,}")
    if min(rows, cols) < MIN_SIDE:
        raise ImageRejected(f"image is {cols}x{rows} pixels; films under {MIN_SIDE} px are not scored")


def _decode(ds: Dataset) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder, truncated or corrupt stream: all mean "cannot read these pixels"
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImageRejected(f"unreadable pixel data ({name}): {str(exc)[:200]}") from exc
    if arr.ndim != 2:
        raise ImageRejected(f"unreadable pixel data: expected one grayscale frame, got shape {arr.shape}")
    return arr


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


def _voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """Applies the VOI stage; returns the output and the range it is defined on (what maps to black..white)."""
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
    return values, float(values.min()), float(values.max())


def to_8bit(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → Modality LUT → VOI LUT/window (else min–max) → MONOCHROME1 inversion → uint8."""
    try:
        values, lo, hi = _voi(apply_modality_lut(arr, ds), ds)
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


def read_dicom(data: bytes, *, max_pixels: int, guard: bool = True) -> tuple[Image.Image, DicomInfo]:
    """Decodes a single-frame CR/DX chest film to 8-bit grayscale; raises FilmRefused (guard) or ImageRejected.

    guard=False skips the guard, to show a refused film to people; such pixels must never be scored.
    """
    ds = _parse(io.BytesIO(data), header_only=False)
    info = _info(ds)
    reason = info.refusal() if guard else None
    if reason:
        raise FilmRefused(reason)
    try:
        _check_pixel_module(ds, max_pixels)
    except ImageRejected:
        raise
    except (TypeError, ValueError) as exc:  # e.g. Rows or NumberOfFrames that are not numbers
        raise ImageRejected(f"unreadable DICOM header: invalid image attributes ({type(exc).__name__})") from exc
    return Image.fromarray(to_8bit(_decode(ds), ds)), info
