"""DICOM reading: the pixel pipeline on real films, hand-computed windowing, compression, the guard, PHI hygiene."""
from __future__ import annotations

import io
import logging
import struct
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder

from core.films.dicom import DicomInfo, read_dicom, read_dicom_info
from core.films.dicom_pixels import PREFERRED_PLUGINS, preferred_plugin
from core.films.errors import ImageRejected
from core.films.imaging import load_grayscale
from core.ml.bundle import load_bundle
from core.ml.preprocess import preprocess
from core.ml.scoring import score_images
from tests.conftest import fixture_images
from tests.dicom_samples import (ACCESSION, PATIENT_ID, PATIENT_NAME, compressed, film, make_dataset, to_bytes,
                                 with_voi_lut)

FULL_RANGE = 1  # fixture_images()[1] spans 0..255, so min–max scaling leaves its pixels unchanged


def pixels(ds, **kwargs) -> np.ndarray:
    """Decodes a dataset through the same entry point the pipeline uses."""
    return np.asarray(load_grayscale(to_bytes(ds), **kwargs))


def row(values, dtype=np.uint16, size=64) -> np.ndarray:
    """A size×size image whose first row starts with `values` (the rest repeats the first value)."""
    arr = np.full((size, size), values[0], dtype=dtype)
    arr[0, : len(values)] = values
    return arr


# --- pixel values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", fixture_images(), ids=lambda p: p.stem)
def test_dx_with_identity_window_reproduces_the_fixture_pixels(path):
    v = film(path)
    # LINEAR with center 128, width 256 on 0..255: ((x - 127.5) / 255 + 0.5) * 255 = x.
    ds = make_dataset(v, WindowCenter=128, WindowWidth=256)
    assert np.array_equal(pixels(ds), v)


def test_16_bit_stored_film_with_exact_window_reproduces_the_fixture():
    v = film(fixture_images()[0])
    ds = make_dataset(v.astype(np.uint16) * 257, bits_stored=16, VOILUTFunction="LINEAR_EXACT",
                      WindowCenter=32767.5, WindowWidth=65535)
    assert np.array_equal(pixels(ds), v)


def test_12_bit_without_voi_uses_min_max():
    v = film(fixture_images()[FULL_RANGE])
    assert (v.min(), v.max()) == (0, 255)
    ds = make_dataset(v.astype(np.uint16) * 16, modality="CR", bits_stored=12)
    assert ds.BitsStored == 12
    assert np.array_equal(pixels(ds), v)


# Stored x → Modality LUT y = 2x − 1000 → LINEAR window c = 1000, w = 1001 (PS3.3 C.11.2.1.2.1):
#   y ≤ c − 0.5 − (w − 1)/2 = 499.5 → 0;  y > c − 0.5 + (w − 1)/2 = 1499.5 → 255;
#   otherwise ((y − 999.5) / 1000 + 0.5) × 255.
#   x=700: y=400 → 0.  x=900: y=800 → 0.3005×255 = 76.63 → 77.  x=1000: y=1000 → 0.5005×255 = 127.63 → 128.
#   x=1100: y=1200 → 0.7005×255 = 178.63 → 179.  x=1200: y=1400 → 0.9005×255 = 229.63 → 230.  x=1250: y=1500 → 255.
# Skipping the rescale would give 102 for x=900, so these values also prove the Modality LUT runs first.
RESCALE_WINDOW_IN = [700, 900, 1000, 1100, 1200, 1250]
RESCALE_WINDOW_OUT = [0, 77, 128, 179, 230, 255]


def test_rescale_then_linear_window_matches_hand_computation():
    ds = make_dataset(row(RESCALE_WINDOW_IN), bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000,
                      WindowCenter=1000, WindowWidth=1001)
    assert pixels(ds)[0, :6].tolist() == RESCALE_WINDOW_OUT


def test_monochrome1_inverts_after_windowing():
    ds = make_dataset(row(RESCALE_WINDOW_IN), modality="CR", photometric="MONOCHROME1", bits_stored=12,
                      RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=1001)
    assert pixels(ds)[0, :6].tolist() == [255 - v for v in RESCALE_WINDOW_OUT]


def test_linear_exact_window_matches_hand_computation():
    # ((x − 2048) / 1000 + 0.5) × 255 inside (1548, 2548]: 1748 → 51, 1900 → 89.76 → 90, 2148 → 153, 2548 → 255.
    ds = make_dataset(row([1548, 1748, 1900, 2148, 2548, 3000]), bits_stored=12, VOILUTFunction="LINEAR_EXACT",
                      WindowCenter=2048, WindowWidth=1000)
    assert pixels(ds)[0, :6].tolist() == [0, 51, 90, 153, 255, 255]


def test_sigmoid_window_matches_hand_computation():
    # 255 / (1 + exp(−4 (x − 2048) / 1024)): 0 → 0.09 → 0, 1792 → 255/(1+e) = 68.58 → 69,
    # 2304 → 255/(1+1/e) = 186.42 → 186, 3072 → 255/(1+e⁻⁴) = 250.41 → 250, 4095 → 254.91 → 255.
    ds = make_dataset(row([0, 1792, 2304, 3072, 4095]), bits_stored=12, VOILUTFunction="SIGMOID",
                      WindowCenter=2048, WindowWidth=1024)
    assert pixels(ds)[0, :5].tolist() == [0, 69, 186, 250, 255]


def test_voi_lut_sequence_is_preferred_over_the_window():
    v = film(fixture_images()[2])
    stored = v.astype(np.uint16) * 16
    table = np.rint(255 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
    # The window alone would clip nearly the whole film to white.
    ds = with_voi_lut(make_dataset(stored, bits_stored=12, WindowCenter=100, WindowWidth=50), table, bits=8)
    out = pixels(ds)
    assert np.array_equal(out, table[stored])
    assert not np.array_equal(out, v)


def test_voi_lut_declared_16_bit_but_holding_12_bit_values_is_not_darkened():
    stored = row([0, 1000, 2048, 4095])
    ds = with_voi_lut(make_dataset(stored, bits_stored=12), np.arange(4096), bits=16)
    # Scaled as 12-bit output: 1000/4095×255 = 62.27 → 62, 2048/4095×255 = 127.53 → 128.
    assert pixels(ds)[0, :4].tolist() == [0, 62, 128, 255]


@pytest.mark.parametrize("path", fixture_images()[:2], ids=lambda p: p.stem)
def test_monochrome1_and_its_monochrome2_twin_give_the_same_tensor_and_score(path, bundle_dir):
    v = film(path).astype(np.uint16) * 257
    mono2 = make_dataset(v, modality="DX", bits_stored=16, PresentationLUTShape="IDENTITY")
    # The DX IOD pairs MONOCHROME1 with Presentation LUT Shape INVERSE: one inversion, not two.
    mono1 = make_dataset(65535 - v, modality="CR", photometric="MONOCHROME1", bits_stored=16,
                         PresentationLUTShape="INVERSE")
    images = [load_grayscale(to_bytes(mono2)), load_grayscale(to_bytes(mono1))]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    x = preprocess(images)
    assert torch.equal(x[0], x[1])
    bundle = load_bundle(bundle_dir)
    jpeg = load_grayscale(path)
    twin2, twin1, original = score_images(bundle, [*images, jpeg])
    # The same tensor twice in one batch: oneDNN need not give rows the same last bits (it did not with one
    # thread, core.ml.threads), so equal to float32 precision.
    assert twin1.logit == pytest.approx(twin2.logit, abs=1e-6) and twin1.score == pytest.approx(twin2.score, abs=1e-6)
    if path == fixture_images()[FULL_RANGE]:  # full-range film: the DICOM path equals the JPEG path
        assert np.array_equal(np.asarray(images[0]), np.asarray(jpeg))
        assert twin2.logit == pytest.approx(original.logit, abs=1e-6)


def test_presentation_lut_inverse_on_monochrome2_inverts():
    v = film(fixture_images()[FULL_RANGE])
    ds = make_dataset(v, PresentationLUTShape="INVERSE")
    assert np.array_equal(pixels(ds), 255 - v)


# --- transfer syntaxes ------------------------------------------------------------------------------------


def test_runtime_dependencies_install_the_preferred_decoder_of_every_compressed_syntax():
    # pyproject's runtime dependencies, not the test extra, provide each syntax's first choice and libjpeg/openjpeg.
    for syntax, order in PREFERRED_PLUGINS.items():
        assert preferred_plugin(syntax) == order[0], syntax.name
    for syntax in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                   uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless):
        assert "pylibjpeg" in get_decoder(syntax).available_plugins, syntax.name


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEGLossless,
                                    uid.JPEGLosslessSV1], ids=lambda s: s.name)
def test_lossless_compressed_12_bit_decodes_like_uncompressed(syntax):
    v = film(fixture_images()[3]).astype(np.uint16)
    stored = v * 16 + v // 16  # uses all 12 bits
    plain = make_dataset(stored, modality="CR", photometric="MONOCHROME1", bits_stored=12,
                         WindowCenter=2000, WindowWidth=3000)
    expected = pixels(plain)
    packed = compressed(make_dataset(stored, modality="CR", photometric="MONOCHROME1", bits_stored=12,
                                     WindowCenter=2000, WindowWidth=3000), syntax)
    assert packed.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(pixels(packed), expected)


def test_jpeg_baseline_decodes_like_the_codestream():
    v = film(fixture_images()[4])
    ds = compressed(make_dataset(v, WindowCenter=128, WindowWidth=256), uid.JPEGBaseline8Bit)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    reference = np.asarray(Image.open(io.BytesIO(codestream)).convert("L")).astype(int)
    assert np.abs(pixels(ds).astype(int) - reference).max() <= 1


def test_an_rle_stream_that_overruns_its_frame_is_rejected_not_a_panic_that_escapes():
    # pylibjpeg-rle (Rust) panics on a 16-bit frame whose high-byte segment decodes past the frame's end; pyo3 raises
    # that as PanicException, a BaseException, which would get past every `except Exception` up to the worker.
    ds = compressed(make_dataset(np.full((64, 64), 1000, np.uint16), bits_stored=12), uid.RLELossless)
    run = bytes([0x81, 7]) * 32  # 32 replicate runs of 128 bytes: exactly one segment of a 64x64 frame
    high, low = run + bytes([0x81, 7]), run  # one run too many in the first segment
    ds.PixelData = encapsulate([struct.pack("<16L", 2, 64, 64 + len(high), *[0] * 13) + high + low])
    with pytest.raises(ImageRejected, match=r"unreadable pixel data \(RLE Lossless\)"):
        read_dicom(to_bytes(ds), max_pixels=10_000_000)


def _12_bit_film(syntax):
    v = film(fixture_images()[3]).astype(np.uint16)
    if syntax == uid.JPEGBaseline8Bit:
        return compressed(make_dataset(v.astype(np.uint8)), syntax)
    return compressed(make_dataset(v * 16 + v // 16, modality="CR", bits_stored=12), syntax)


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                                    uid.JPEGLSLossless, uid.JPEG2000Lossless], ids=lambda s: s.name)
def test_a_film_is_decoded_by_its_syntax_s_preferred_decoder_alone(syntax, monkeypatch):
    # pydicom on its own takes the first plugin it lists: gdcm or pylibjpeg for baseline JPEG (4.7x Pillow's CPU),
    # pylibjpeg for JPEG-LS (4.5x pyjpegls'), gdcm's multi-threaded JPEG 2000 (bench/decode.py).
    data = to_bytes(_12_bit_film(syntax))
    decoder, used = get_decoder(syntax), []
    for name in decoder.available_plugins:
        if name != PREFERRED_PLUGINS[syntax][0]:
            monkeypatch.setitem(decoder._available, name, lambda *a, name=name, **k: used.append(name) or 1 / 0)
    img, _ = read_dicom(data, max_pixels=10_000_000)
    assert used == [] and img.mode == "L"


def test_a_frame_the_preferred_decoder_cannot_read_goes_to_the_other_installed_decoders(monkeypatch):
    ds = _12_bit_film(uid.JPEGLossless)
    data, expected = to_bytes(ds), pixels(ds)
    assert preferred_plugin(uid.JPEGLossless) == "gdcm"
    monkeypatch.setitem(get_decoder(uid.JPEGLossless)._available, "gdcm", lambda *a, **k: 1 / 0)
    img, _ = read_dicom(data, max_pixels=10_000_000)
    assert np.array_equal(np.asarray(img), expected)


# --- refusals (the guard and unreadable files) ------------------------------------------------------------


def _film_ds(**kwargs):
    return make_dataset(film(fixture_images()[0]), **kwargs)


def _without(keyword):
    ds = _film_ds()
    delattr(ds, keyword)
    return ds


REFUSED = {
    "ct": (lambda: _film_ds(modality="CT"), "modality CT is not scored"),
    "secondary-capture": (lambda: _film_ds(modality="OT"), "modality OT is not scored"),
    "no-modality": (lambda: _without("Modality"), "modality missing is not scored"),
    "lateral-LL": (lambda: _film_ds(ViewPosition="LL"), "lateral view (ViewPosition LL)"),
    "lateral-RL": (lambda: _film_ds(ViewPosition="RL"), "lateral view (ViewPosition RL)"),
    "lateral-LAT": (lambda: _film_ds(ViewPosition="LAT"), "lateral view (ViewPosition LAT)"),
    "oblique": (lambda: _film_ds(ViewPosition="RLO"), "oblique view"),
    "not-chest": (lambda: _film_ds(BodyPartExamined="ABDOMEN"), "body part ABDOMEN is not chest"),
    "multi-frame": (lambda: make_dataset(np.stack([film(fixture_images()[0])] * 2)), "multi-frame DICOM (2 frames)"),
    "colour": (lambda: make_dataset(np.stack([film(fixture_images()[0])] * 3, axis=-1), photometric="RGB"),
               "colour DICOM (RGB)"),
    "no-pixels": (lambda: _without("PixelData"), "has no Pixel Data"),
    "zero-width-window": (lambda: _film_ds(WindowCenter=100, WindowWidth=0), "invalid Modality LUT, VOI LUT or window"),
}


@pytest.mark.parametrize("case", REFUSED, ids=str)
def test_guard_refuses_with_reason(case):
    build, reason = REFUSED[case]
    with pytest.raises(ImageRejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_grayscale(to_bytes(build()))


@pytest.mark.parametrize("elements", [{"BodyPartExamined": "chest"}, {"ViewPosition": "AP"}, {"modality": "CR"},
                                      {"BodyPartExamined": "THORAX", "ViewPosition": ""}])
def test_guard_accepts_frontal_chest_variants(elements):
    assert pixels(_film_ds(**elements)).shape == film(fixture_images()[0]).shape


def test_guard_accepts_absent_body_part_and_view():
    ds = _film_ds()
    del ds.BodyPartExamined, ds.ViewPosition
    assert pixels(ds).shape == film(fixture_images()[0]).shape


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_corrupt_and_truncated_files_are_refused():
    rng = np.random.default_rng(0)
    garbage = b"\0" * 128 + b"DICM" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageRejected, match="unreadable DICOM header"):
        load_grayscale(garbage)
    whole = to_bytes(_film_ds())
    with pytest.raises(ImageRejected, match="unreadable pixel data"):
        load_grayscale(whole[:-5000])
    j2k = to_bytes(compressed(_film_ds(), uid.JPEG2000Lossless))
    with pytest.raises(ImageRejected, match=r"unreadable DICOM header: truncated or corrupt"):
        load_grayscale(j2k[:-600])  # cut inside the encapsulated pixel data
    assert j2k.count(b"\xff\x4f\xff\x51") == 1  # the codestream's SOC + SIZ markers
    with pytest.raises(ImageRejected, match=r"unreadable pixel data \(JPEG 2000"):
        load_grayscale(j2k.replace(b"\xff\x4f\xff\x51", b"\0\0\0\0"))


def test_oversized_film_is_refused_before_decoding():
    with pytest.raises(ImageRejected, match="over the limit of 1,000"):
        load_grayscale(to_bytes(_film_ds()), max_pixels=1000)


# --- identity and PHI -------------------------------------------------------------------------------------


def test_dicom_is_recognised_by_preamble_not_name(tmp_path):
    path = tmp_path / "looks-like.png"
    path.write_bytes(to_bytes(_film_ds(WindowCenter=128, WindowWidth=256)))
    assert np.array_equal(np.asarray(load_grayscale(path)), film(fixture_images()[0]))


def test_read_dicom_info_reads_identity_from_the_header_only():
    ds = _film_ds()
    data = to_bytes(ds)
    info = read_dicom_info(data[:-5000])  # pixel data cut short: the header alone must suffice
    assert info.to_dict() == {
        "sop_instance_uid": ds.SOPInstanceUID, "sop_class_uid": uid.DigitalXRayImageStorageForPresentation,
        "study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
        "accession_number": ACCESSION, "patient_id": PATIENT_ID, "patient_name": PATIENT_NAME,
        "patient_sex": "F", "patient_age": "045Y", "study_date": "20240102", "study_time": "101530",
        "modality": "DX", "body_part_examined": "CHEST", "view_position": "PA",
    }
    assert DicomInfo.from_dict(info.to_dict()) == info
    assert info.study_datetime() == datetime(2024, 1, 2, 10, 15, 30)
    image, full = read_dicom(data, max_pixels=10**8)
    assert full == info and image.mode == "L"
    with pytest.raises(ImageRejected, match="not a DICOM file"):
        read_dicom_info(fixture_images()[0].read_bytes())


def test_read_dicom_info_from_a_path(tmp_path):
    ds = _film_ds()
    path = tmp_path / "anything"
    path.write_bytes(to_bytes(ds))
    assert read_dicom_info(path).sop_instance_uid == ds.SOPInstanceUID
    assert read_dicom_info(str(path)) == read_dicom_info(path.read_bytes())
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty file"):
        read_dicom_info(tmp_path / "empty")
    with pytest.raises(ImageRejected, match="not a DICOM file"):
        read_dicom_info(fixture_images()[0])


def test_patient_identifiers_stay_out_of_logs_reasons_and_repr(caplog):
    caplog.set_level(logging.DEBUG)
    reasons = []
    for build, _ in REFUSED.values():
        with pytest.raises(ImageRejected) as exc:
            load_grayscale(to_bytes(build()))
        reasons.append(str(exc.value))
    image, info = read_dicom(to_bytes(_film_ds()), max_pixels=10**8)
    text = caplog.text + "\n".join(reasons) + repr(info)
    assert info.sop_instance_uid in repr(info)
    for phi in (PATIENT_ID, PATIENT_NAME, "Testperson", ACCESSION, "20240102"):
        assert phi not in text


def test_malformed_identity_values_are_read_without_warnings(caplog):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building an invalid file: pydicom rightly complains here
        data = to_bytes(_film_ds(PatientID="SECRET-ID" * 10, PatientName="SECRET" * 20, PatientAge="SECRET-AGE",
                                 StudyDate="SECRETDATE"))
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = read_dicom_info(data)
        read_dicom(data, max_pixels=10**8)
    # pydicom's read-time validation (over-long LO/PN here) would warn, and some of its warnings quote values.
    assert [str(w.message) for w in caught] == [] and caplog.records == []
    assert info.patient_id == "SECRET-ID" * 10 and info.study_datetime() is None
