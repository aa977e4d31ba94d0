"""DICOM radiographs: identity from the header, the guard, and pixels to 8-bit grayscale the way a viewer shows them."""
from __future__ import annotations

import io
import os
import zlib
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.valuerep import DA, TM

from core.films.dicom_pixels import decode_pixels, to_8bit
from core.films.errors import DEFAULT_MAX_FILE_BYTES, MIN_SIDE, FilmRefused, ImageRejected, over_limit

# pydicom's read-time validation warnings quote element values (names, IDs, dates); they must never reach a log.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

SCORED_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG"})
# Lateral and oblique projections: the model has only seen frontal (PA/AP) films.
NON_FRONTAL_VIEWS = {"LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral",
                     "LLO": "oblique", "RLO": "oblique"}
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


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


def _is_pixel_data(tag, vr, length) -> bool:
    return tag in (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float and (plain) Pixel Data


def _not_file_meta(tag, vr, length) -> bool:
    return tag >> 16 != 0x0002


def inflate_bounded(deflated: bytes, *, max_bytes: int) -> bytes:
    """Inflates a raw deflate stream (PS3.5 A.5) to at most max_bytes; a larger result is refused unbuilt."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(deflated, max_bytes + 1)
    except zlib.error as exc:
        raise ImageRejected(f"unreadable DICOM header: corrupt Deflated data ({exc})") from exc
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise ImageRejected(f"Deflated DICOM inflates beyond {max_bytes:,} bytes")
    return out


def _read_deflated(stream: BinaryIO, *, header_only: bool, max_bytes: int) -> Dataset | None:
    """Reads a Deflated Explicit VR Little Endian file with its inflated size capped; None for other syntaxes.

    pydicom inflates such a file in one unbounded call (a 299 KiB file can hold hundreds of megabytes of
    zeros), so the file meta is read here, the rest inflated under the cap and parsed as pydicom would.
    """
    stream.seek(132)
    meta = FileMetaDataset(read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                                        stop_when=_not_file_meta))
    if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
        return None
    inflated = io.BytesIO(inflate_bounded(stream.read(), max_bytes=max_bytes))
    body = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True,
                        stop_when=_is_pixel_data if header_only else None)
    stream.seek(0)
    ds = FileDataset(inflated, body, preamble=stream.read(128), file_meta=meta, is_implicit_VR=False,
                     is_little_endian=True)
    ds.set_original_encoding(False, True)
    return ds


def _parse(stream: BinaryIO, *, header_only: bool, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Dataset:
    head = stream.read(132)
    if not head:
        raise ImageRejected("empty file (0 bytes)")
    if not is_dicom(head):
        raise ImageRejected("not a DICOM file (no DICM preamble)")
    try:
        ds = _read_deflated(stream, header_only=header_only, max_bytes=max_bytes)
        if ds is None:
            stream.seek(0)
            ds = pydicom.dcmread(stream, stop_before_pixels=header_only)
        uid_present = bool(str(ds.get("SOPInstanceUID") or "").strip())
    except ImageRejected:
        raise
    except InvalidDicomError as exc:
        raise ImageRejected(f"unreadable DICOM header: {exc}") from exc
    except MemoryError as exc:
        raise ImageRejected("unreadable DICOM header: an element is too large to read") from exc
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


def read_dicom_info(source: bytes | str | Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> DicomInfo:
    """Reads identity from the header only (a file's pixel data is not even read), for ingest to record quickly.

    A file over max_bytes is refused; so is a Deflated file that would inflate beyond it.
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise ImageRejected(over_limit(size, max_bytes))
            return _info(_parse(fh, header_only=True, max_bytes=max_bytes))
    if len(source) > max_bytes:
        raise ImageRejected(over_limit(len(source), max_bytes))
    return _info(_parse(io.BytesIO(source), header_only=True, max_bytes=max_bytes))


_UID_ATTRIBUTES = (("sop_instance_uid", "SOPInstanceUID"), ("sop_class_uid", "SOPClassUID"),
                   ("study_instance_uid", "StudyInstanceUID"), ("series_instance_uid", "SeriesInstanceUID"))


def header_identity(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[DicomInfo | None, str | None]:
    """For ingest: (identity, None) for a usable DICOM header, (None, reason) for an unusable one, (None, None)
    for a file that is not DICOM at all.

    The four UIDs must be valid DICOM UIDs (PS3.5 9.1: digits and dots, no leading zero in a component other
    than "0" itself, at most 64 characters): they key deduplication and grouping, so a malformed one fails.
    """
    with open(path, "rb") as fh:
        if not is_dicom(fh.read(132)):
            return None, None
    try:
        info = read_dicom_info(path, max_bytes=max_bytes)
    except ImageRejected as exc:
        return None, str(exc)
    for attribute, keyword in _UID_ATTRIBUTES:
        value = getattr(info, attribute) or ""
        if len(value) > 64:  # DICOM's limit; a clipped UID could merge distinct instances or studies
            return None, f"unreadable DICOM header: {attribute} is {len(value)} characters, over the 64 allowed"
        if value and not uid.UID(value).is_valid:
            return None, f"unreadable DICOM header: {keyword} is not a valid DICOM UID"
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
        arr = decode_pixels(ds)
    except Exception as exc:  # missing decoder, truncated or corrupt stream: all mean "cannot read these pixels"
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImageRejected(f"unreadable pixel data ({name}): {str(exc)[:200]}") from exc
    if arr.ndim != 2:
        raise ImageRejected(f"unreadable pixel data: expected one grayscale frame, got shape {arr.shape}")
    return arr


def read_dicom(data: bytes, *, max_pixels: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
               guard: bool = True) -> tuple[Image.Image, DicomInfo]:
    """Decodes a single-frame CR/DX chest film to 8-bit grayscale; raises FilmRefused (guard) or ImageRejected.

    guard=False skips the guard, to show a refused film to people; such pixels must never be scored.
    """
    if len(data) > max_bytes:
        raise ImageRejected(over_limit(len(data), max_bytes))
    ds = _parse(io.BytesIO(data), header_only=False, max_bytes=max_bytes)
    info = _info(ds)
    reason = info.refusal() if guard else None
    if reason:
        raise FilmRefused(reason)
    try:
        _check_pixel_module(ds, max_pixels)
        return Image.fromarray(to_8bit(_decode(ds), ds)), info
    except ImageRejected:
        raise
    except (TypeError, ValueError) as exc:  # e.g. Rows or NumberOfFrames that are not numbers
        raise ImageRejected(f"unreadable DICOM header: invalid image attributes ({type(exc).__name__})") from exc
    except MemoryError as exc:
        raise ImageRejected("unreadable pixel data: too large to decode in memory") from exc
    except Exception as exc:  # any other decoder failure costs this file only; messages may quote values (PHI)
        raise ImageRejected(f"unreadable DICOM file ({type(exc).__name__})") from exc
