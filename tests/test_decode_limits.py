"""Decoding limits: only PNG/JPEG/DICOM, complete pixel data, byte caps (Deflated DICOM too), DICOM UID syntax,
and a seeded fuzz run: hostile bytes end as a grayscale film or an ImageRejected, never anything else."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom import uid
from pydicom.config import disable_value_validation

from core.films.dicom import header_identity, read_dicom_info
from core.films.errors import ImageRejected
from core.films.imaging import load_grayscale
from tests.conftest import fixture_images
from tests.dicom_samples import compressed, film, make_dataset, to_bytes

NOT_A_FILM = "not a PNG, JPEG or DICOM file"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ihdr(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 0, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, interlace))


def gray_png(width: int, height: int, raw: bytes, *, interlace: int = 0, extra: bytes = b"") -> bytes:
    """An 8-bit grayscale PNG around the given raw (filtered) scanline bytes."""
    return (PNG_SIGNATURE + ihdr(width, height, interlace=interlace) + extra
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def without_last_raw_byte(png: bytes) -> bytes:
    """The same PNG with its inflated pixel stream one byte short (every chunk still well-formed)."""
    pos, out, idat = 8, [png[:8]], []
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat.append(png[pos + 8:pos + 8 + length])
        else:
            if kind == b"IEND":
                out.append(chunk(b"IDAT", zlib.compress(zlib.decompress(b"".join(idat))[:-1])))
            out.append(png[pos:pos + 12 + length])
        pos += 12 + length
    return b"".join(out)


def rejection(data, **kwargs) -> str:
    with pytest.raises(ImageRejected) as info:
        load_grayscale(data, **kwargs)
    return str(info.value)


@pytest.fixture
def pillow_pads_truncated_images(monkeypatch):
    """Turns on Pillow's process-wide switch that pads a cut-off image with black, as any import could."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)


# --- formats and complete pixel data --------------------------------------------------------------------------


@pytest.mark.parametrize("pad_truncated", [False, True], ids=["pillow-default", "pillow-pads-truncated"])
def test_a_127_byte_png_claiming_2000x2000_is_refused(monkeypatch, pad_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pad_truncated)
    head = PNG_SIGNATURE + ihdr(2000, 2000)
    idat = chunk(b"IDAT", zlib.compress(bytes(2001 * 8), 9))  # eight black rows out of 2,000
    end = chunk(b"IEND", b"")
    text = chunk(b"tEXt", b"Comment\0" + b"x" * (127 - len(head) - len(idat) - len(end) - 20))
    data = head + text + idat + end
    assert len(data) == 127
    # Pillow "decodes" this file, even with its truncation switch off (the zlib stream ends on a row
    # boundary): a black 2000x2000 film that used to be scored.
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.size == (2000, 2000) and img.getextrema() == (0, 0)
    assert rejection(data) == ("truncated or corrupt image data: PNG pixel data is incomplete "
                               "(16,008 of 4,002,000 bytes)")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is pad_truncated  # the check does not depend on the switch


def test_complete_interlaced_and_bit_packed_pngs_decode_and_one_byte_short_is_refused(pillow_pads_truncated_images):
    pixels = np.asarray(load_grayscale(fixture_images()[0]))[:67, :101].copy()  # odd sizes: partial Adam7 blocks
    raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in ADAM7
                   for row in pixels[y0::dy, x0::dx] if row.size)
    interlaced = gray_png(101, 67, raw, interlace=1)
    with Image.open(io.BytesIO(interlaced)) as img:
        assert img.info.get("interlace") == 1
    bilevel = saved(Image.fromarray(pixels > 128).convert("1"))  # 1 bit per pixel, 13 bytes per 101-px row
    sixteen = saved(Image.fromarray(pixels.astype(np.uint16) * 257))
    rgba = saved(Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA"))
    assert np.array_equal(np.asarray(load_grayscale(interlaced)), pixels)
    assert np.array_equal(np.asarray(load_grayscale(bilevel)), np.where(pixels > 128, 255, 0))
    assert np.array_equal(np.asarray(load_grayscale(sixteen)), pixels)
    assert np.array_equal(np.asarray(load_grayscale(rgba)), pixels)
    for data in (interlaced, bilevel, sixteen, rgba):
        assert "PNG pixel data is incomplete" in rejection(without_last_raw_byte(data))


@pytest.mark.parametrize("pad_truncated", [False, True], ids=["pillow-default", "pillow-pads-truncated"])
def test_a_png_whose_last_row_holds_data_is_inflated_once_and_any_shortfall_is_still_refused(monkeypatch,
                                                                                              pad_truncated):
    from core.films import imaging

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pad_truncated)
    checked = []
    real_check = imaging._check_png_complete
    monkeypatch.setattr(imaging, "_check_png_complete", lambda data: checked.append(len(data)) or real_check(data))
    pixels = np.asarray(load_grayscale(fixture_images()[0]))[:67, :101].copy()
    pixels[-1] = np.maximum(pixels[-1], 1)
    complete = {"8-bit": saved(Image.fromarray(pixels)),
                "16-bit": saved(Image.fromarray(pixels.astype(np.uint16) * 257)),
                "RGBA": saved(Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA"))}
    for name, data in complete.items():
        assert np.array_equal(np.asarray(load_grayscale(data)), pixels), name
    assert checked == []  # the last row proved each of them complete
    black_last_row = pixels.copy()
    black_last_row[-1] = 0
    raw = b"".join(b"\0" + row.tobytes() for row in black_last_row)
    assert np.array_equal(np.asarray(load_grayscale(saved(Image.fromarray(black_last_row)))), black_last_row)
    assert np.array_equal(np.asarray(load_grayscale(gray_png(101, 67, raw, interlace=0))), black_last_row)
    assert len(checked) == 2  # a black last row proves nothing: checked in full
    # Cut short, each is refused: by Pillow itself where it notices, else (padding on) by the full check.
    expected = "PNG pixel data is incomplete" if pad_truncated else "truncated or corrupt image data"
    for name, data in complete.items():
        assert expected in rejection(without_last_raw_byte(data)), name
    whole_rows = gray_png(101, 67, b"".join(b"\0" + row.tobytes() for row in pixels[:-1]))  # the last row missing
    assert "PNG pixel data is incomplete" in rejection(whole_rows)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_other_raster_formats_are_refused(fmt):
    data = saved(Image.open(fixture_images()[0]), fmt)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt and img.size == (198, 160)  # Pillow would read it; Chest-Aid does not
    assert rejection(data) == NOT_A_FILM


# --- byte caps --------------------------------------------------------------------------------------------------


def test_a_file_over_max_bytes_is_refused_before_it_is_read(tmp_path):
    path = fixture_images()[0]
    size = path.stat().st_size
    assert rejection(path, max_bytes=size - 1) == f"file is {size:,} bytes, over the limit of {size - 1:,}"
    assert rejection(path.read_bytes(), max_bytes=1000) == f"file is {size:,} bytes, over the limit of 1,000"
    assert load_grayscale(path, max_bytes=size).size == (198, 160)
    dcm = tmp_path / "film.dcm"
    dcm.write_bytes(to_bytes(make_dataset(film(path))))
    big = dcm.stat().st_size
    assert rejection(dcm, max_bytes=big - 1) == f"file is {big:,} bytes, over the limit of {big - 1:,}"
    with pytest.raises(ImageRejected, match=f"file is {big:,} bytes, over the limit of 4,096"):
        read_dicom_info(dcm, max_bytes=4096)
    assert header_identity(dcm, max_bytes=4096) == (None, f"file is {big:,} bytes, over the limit of 4,096")


def deflated(ds):
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    return ds


def test_deflated_dicom_decodes_like_explicit_vr(tmp_path):
    pixels = film(fixture_images()[1])
    plain = make_dataset(pixels, WindowCenter=128, WindowWidth=256)
    packed = to_bytes(deflated(make_dataset(pixels, WindowCenter=128, WindowWidth=256)))
    assert np.array_equal(np.asarray(load_grayscale(packed)), np.asarray(load_grayscale(to_bytes(plain))))
    path = tmp_path / "deflated.dcm"
    path.write_bytes(packed)
    info, reason = header_identity(path)
    assert reason is None and (info.modality, info.view_position) == ("DX", "PA")


def test_a_deflate_bomb_is_refused_at_the_cap_without_inflating_it_all(tmp_path):
    bomb = to_bytes(deflated(make_dataset(np.zeros((3000, 3000), dtype=np.uint16), bits_stored=12)))
    assert len(bomb) < 40_000  # 18 MB of pixel data
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    reason = "Deflated DICOM inflates beyond 5,000,000 bytes"
    assert header_identity(path, max_bytes=5_000_000) == (None, reason)
    with pytest.raises(ImageRejected, match=reason):
        read_dicom_info(bomb, max_bytes=5_000_000)
    assert rejection(bomb, max_bytes=5_000_000) == reason
    assert read_dicom_info(bomb, max_bytes=20_000_000).sop_instance_uid  # under a larger cap it is an image
    broken = bomb[:-2000] + bytes(2000)
    assert rejection(broken).startswith("unreadable DICOM header: corrupt Deflated data")


# --- DICOM UID syntax -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keyword", "value"), [
    ("StudyInstanceUID", "#1"), ("SOPInstanceUID", "1.2.840.01"), ("SeriesInstanceUID", "1..2"),
    ("SOPClassUID", "1.2.3."), ("StudyInstanceUID", "1.2.3a"), ("SeriesInstanceUID", "1.2 3"),
])
def test_an_invalid_uid_fails_the_header_read_with_its_name(tmp_path, keyword, value):
    ds = make_dataset(film(fixture_images()[0]))
    with disable_value_validation():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        data = to_bytes(ds)
    path = tmp_path / "bad-uid.dcm"
    path.write_bytes(data)
    assert header_identity(path) == (None, f"unreadable DICOM header: {keyword} is not a valid DICOM UID")


def test_valid_uids_including_zero_components_are_accepted(tmp_path):
    ds = make_dataset(film(fixture_images()[0]), StudyInstanceUID="1.2.0.3", SeriesInstanceUID="0.1",
                      SOPInstanceUID="2.25." + "9" * 59)
    path = tmp_path / "ok.dcm"
    path.write_bytes(to_bytes(ds))
    info, reason = header_identity(path)
    assert reason is None
    assert (info.study_instance_uid, info.series_instance_uid, len(info.sop_instance_uid)) == ("1.2.0.3", "0.1", 64)


# --- fuzz ---------------------------------------------------------------------------------------------------


def fuzz_seeds() -> dict[str, bytes]:
    """Real films in every encoding an inbox may hold, including formats Chest-Aid must refuse."""
    pixels = film(fixture_images()[2])
    twelve_bit = pixels.astype(np.uint16) * 16
    seeds = {
        "jpeg": fixture_images()[0].read_bytes(),
        "png": saved(Image.fromarray(pixels)),
        "png-16bit": saved(Image.fromarray(pixels.astype(np.uint16) * 257)),
        "dicom": to_bytes(make_dataset(twelve_bit, bits_stored=12, WindowCenter=2000, WindowWidth=3000)),
        "dicom-rle": to_bytes(compressed(make_dataset(twelve_bit, bits_stored=12), uid.RLELossless)),
        "dicom-deflated": to_bytes(deflated(make_dataset(pixels))),
    }
    for fmt in ("TIFF", "GIF", "DDS"):  # Pillow's readers of these raised TypeError, NotImplementedError…
        seeds[fmt.lower()] = saved(Image.fromarray(pixels), fmt)
    return seeds


def mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One random corruption: overwritten bytes, a cut, an insertion, a copied run or an extreme integer.

    Half the edits land in the first 700 bytes, where the headers a decoder trusts live.
    """
    out = bytearray(data)
    near_head = rng.random() < 0.5

    def position() -> int:
        return int(rng.integers(min(len(out), 700) if near_head else len(out)))
    kind = int(rng.integers(5))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            out[position()] = int(rng.integers(256))
    elif kind == 1:
        del out[position():]
    elif kind == 2:
        at = position()
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 3:
        at, source, n = position(), position(), int(rng.integers(1, 32))
        out[at:at + n] = out[source:source + n]
    else:
        at = position()
        out[at:at + 4] = (b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"\0\0\x01\0")[int(rng.integers(4))]
    return bytes(out)


@pytest.mark.filterwarnings("ignore")  # decoders warn about what they repair; only exceptions matter here
def test_fuzzed_films_decode_to_grayscale_or_are_rejected_and_nothing_else():
    seeds = fuzz_seeds()
    rng = np.random.default_rng(20240817)
    outcomes = {"decoded": 0, "rejected": 0}
    for case in range(450):
        name = list(seeds)[case % len(seeds)]
        data = mutate(rng, seeds[name])
        try:
            img = load_grayscale(data, max_pixels=2_000_000)
        except ImageRejected as exc:
            assert str(exc), (case, name)
            outcomes["rejected"] += 1
            continue
        except BaseException as exc:  # the defect under test: any other exception type escapes the decoder
            pytest.fail(f"case {case} ({name}): {type(exc).__name__}: {exc}")
        assert isinstance(img, Image.Image) and img.mode == "L" and min(img.size) >= 64, (case, name)
        outcomes["decoded"] += 1
    # Both outcomes occur, so the run exercises decoding and rejection alike.
    assert outcomes["decoded"] > 50 and outcomes["rejected"] > 50, outcomes
