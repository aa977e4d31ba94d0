"""DICOM pixels are mapped to 8 bits through a table of the values a film can hold (core.films.dicom_pixels):
the bytes must be those of mapping every pixel, whatever the header asks for."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from core.films import dicom_pixels
from core.films.errors import ImageRejected
from tests.dicom_samples import make_dataset, with_voi_lut

RNG = np.random.default_rng(7)


def modality_lut(table: np.ndarray, *, first: int) -> Sequence:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(table), first, 16])
    item.add_new("ModalityLUTType", "LO", "US")
    item.add_new("LUTData", "US", [int(v) for v in table])
    return Sequence([item])


def film(low: int, high: int, dtype, shape=(96, 80)) -> np.ndarray:
    return RNG.integers(low, high + 1, shape).astype(dtype)


def cases():
    twelve = film(100, 3900, np.uint16)
    signed = film(-1024, 3071, np.int16)
    yield "12-bit min-max", twelve, make_dataset(twelve, bits_stored=12)
    yield "12-bit window", twelve, make_dataset(twelve, bits_stored=12, WindowCenter=1900.5, WindowWidth=1201)
    yield "rescale + window, MONOCHROME1", twelve, make_dataset(
        twelve, modality="CR", photometric="MONOCHROME1", bits_stored=12, RescaleSlope=0.7,
        RescaleIntercept=-312.25, WindowCenter=1000, WindowWidth=1501)
    yield "linear exact", twelve, make_dataset(twelve, bits_stored=12, VOILUTFunction="LINEAR_EXACT",
                                               WindowCenter=2048, WindowWidth=999)
    yield "sigmoid", twelve, make_dataset(twelve, bits_stored=12, VOILUTFunction="SIGMOID",
                                          WindowCenter=2047, WindowWidth=1777)
    table = np.rint(255 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    yield "8-bit VOI LUT", twelve, with_voi_lut(make_dataset(twelve, bits_stored=12), table, bits=8)
    yield "signed, rescale, min-max", signed, make_dataset(signed, bits_stored=16, RescaleSlope=1.5,
                                                           RescaleIntercept=17, PresentationLUTShape="INVERSE")
    sixteen = film(0, 65535, np.uint16)
    yield "16-bit full range", sixteen, make_dataset(sixteen, bits_stored=16)
    eight = film(3, 250, np.uint8)
    yield "8-bit", eight, make_dataset(eight, WindowCenter=128, WindowWidth=200)
    # A non-monotonic Modality LUT with min-max scaling: the range must come from the values the film holds,
    # not from every value between its lowest and highest (the table's peak at 2000 is absent from the film).
    lut = np.abs(np.arange(4096) - 2000).astype(np.uint16)
    lut[2000] = 9000
    gappy = np.where(film(0, 1, np.uint16) == 1, 500, 3500).astype(np.uint16)
    gappy[0, :3] = [1000, 2500, 3000]
    ds = make_dataset(gappy, bits_stored=12)
    ds.ModalityLUTSequence = modality_lut(lut, first=0)
    yield "modality LUT, min-max over present values", gappy, ds


@pytest.mark.parametrize("name,arr,ds", list(cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_table_gives_the_bytes_of_mapping_every_pixel(name, arr, ds):
    by_table = dicom_pixels.to_8bit(arr, ds)
    every_pixel = dicom_pixels._map(arr, ds, None)
    assert by_table.dtype == np.uint8 and by_table.shape == arr.shape
    assert np.array_equal(by_table, every_pixel)
    assert len(np.unique(by_table)) > 2  # the cases are real gradations, not a constant or two values


def test_the_table_path_is_taken_for_16_bit_pixels_and_not_for_float(monkeypatch):
    seen = []
    real = dicom_pixels._map
    monkeypatch.setattr(dicom_pixels, "_map", lambda arr, ds, present: seen.append(arr.shape) or real(arr, ds, present))
    arr = film(10, 1000, np.uint16)
    dicom_pixels.to_8bit(arr, make_dataset(arr, bits_stored=12))
    assert seen == [(1001,)]  # unsigned: one entry per value from 0 to the highest, not the 96×80 pixels
    seen.clear()
    dicom_pixels.to_8bit(arr.astype(np.int16), make_dataset(arr.astype(np.int16), bits_stored=12))
    assert seen == [(991,)]  # signed: from the lowest value to the highest
    seen.clear()
    dicom_pixels.to_8bit(arr.astype(np.float32), make_dataset(arr, bits_stored=12))
    assert seen == [(96, 80)]


def test_a_film_of_one_value_is_still_refused():
    flat = np.full((64, 64), 1234, np.uint16)
    with pytest.raises(ImageRejected, match="single value"):
        dicom_pixels.to_8bit(flat, make_dataset(flat, bits_stored=12))


def test_min_max_over_a_monotonic_modality_stage_reads_only_the_extreme_stored_values(monkeypatch):
    # A linear rescale keeps the order of the values, so the film's lowest and highest stored values bound its
    # range; counting every value (np.bincount copies the film to intp) is left to non-monotonic Modality LUTs.
    arr = film(10, 1000, np.uint16)
    expected = dicom_pixels._map(arr, make_dataset(arr, bits_stored=12, RescaleSlope=-2, RescaleIntercept=5), None)

    def no_count(*args, **kwargs):
        raise AssertionError("bincount over the film")

    monkeypatch.setattr(dicom_pixels.np, "bincount", no_count)
    for slope in (1, -2):
        ds = make_dataset(arr, bits_stored=12, RescaleSlope=slope, RescaleIntercept=5)
        out = dicom_pixels.to_8bit(arr, ds)
        assert out.min() == 0 and out.max() == 255
    assert np.array_equal(out, expected)
