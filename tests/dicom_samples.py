"""Builds DICOM test instances from the real fixture films at test time (no .dcm files are committed)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from core.films.imaging import load_grayscale

PATIENT_ID = "PID-0042-TEST"
PATIENT_NAME = "Testperson^Alice"
ACCESSION = "ACC-20240102-7"
SOP_CLASSES = {"DX": uid.DigitalXRayImageStorageForPresentation, "CR": uid.ComputedRadiographyImageStorage}


def film(path: Path) -> np.ndarray:
    """Returns a fixture film's 8-bit grayscale pixels, exactly as the JPEG path reads them."""
    return np.asarray(load_grayscale(path))


def make_dataset(pixels: np.ndarray, *, modality: str = "DX", photometric: str = "MONOCHROME2",
                 bits_stored: int | None = None, **elements) -> Dataset:
    """Builds a complete single-image instance around `pixels` (uint8/uint16/int16 [rows, cols] or frames)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.SOPClassUID = SOP_CLASSES.get(modality, uid.SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = uid.generate_uid()
    ds.StudyInstanceUID = uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.PatientID = PATIENT_ID
    ds.PatientName = PATIENT_NAME
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.AccessionNumber = ACCESSION
    ds.StudyDate = "20240102"
    ds.StudyTime = "101530"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def voi_lut_item(table: np.ndarray, *, first: int = 0, bits: int = 8) -> Dataset:
    """Builds one VOI LUT Sequence item mapping input `first + i` to table[i]."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(table), first, bits])
    item.add_new("LUTData", "US", [int(v) for v in table])
    return item


def with_voi_lut(ds: Dataset, table: np.ndarray, **kwargs) -> Dataset:
    """Adds a VOI LUT Sequence to the dataset."""
    ds.VOILUTSequence = Sequence([voi_lut_item(table, **kwargs)])
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Serialises as a DICOM Part 10 file (preamble, DICM, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def compressed(ds: Dataset, syntax: str) -> Dataset:
    """Re-encodes the pixel data with `syntax`, using whichever encoder that syntax needs."""
    if syntax == uid.JPEGBaseline8Bit:
        # pydicom has no baseline JPEG encoder; Pillow's codestream is what modalities send.
        buf = io.BytesIO()
        Image.fromarray(ds.pixel_array).save(buf, "JPEG", quality=90)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.file_meta.TransferSyntaxUID = syntax
        return ds
    if syntax in (uid.JPEGLossless, uid.JPEGLosslessSV1):
        return _gdcm_compress(ds, syntax)
    ds.compress(syntax, generate_instance_uid=False)
    return ds


def _gdcm_compress(ds: Dataset, syntax: str) -> Dataset:
    import tempfile

    import gdcm
    from pydicom import dcmread

    kind = {uid.JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
            uid.JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1}[syntax]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = f"{tmp}/in.dcm", f"{tmp}/out.dcm"
        Path(src).write_bytes(to_bytes(ds))
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(kind))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(dst)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        out = dcmread(dst)
    assert out.file_meta.TransferSyntaxUID == syntax
    return out
