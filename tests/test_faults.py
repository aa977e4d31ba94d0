"""Bad input through the real ingester and pipeline: every file becomes a row, bad ones fail with a reason."""
from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from core.db import session_scope
from core.intake.ingest import ingest_file
from core.intake.watcher import Ingester
from core.ml.bundle import load_bundle
from core.models import Status, Study
from core.pipeline import process_studies
from core.settings import Settings
from tests.conftest import fixture_images
from tests.services import wait_for

MAX_PIXELS = 200_000



@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, device="cpu")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def inbox_files() -> dict[str, bytes]:
    """The films a night of scanner output might hold: good ones, odd encodings and broken files."""
    film = fixture_images()[0]
    data = film.read_bytes()
    with Image.open(film) as img:
        pixels = np.asarray(img).copy()
    rgba = np.stack([pixels, pixels, pixels, np.full_like(pixels, 255)], axis=-1)
    return {
        "film.jpeg": data,
        "film-16bit.png": png(Image.fromarray(pixels.astype(np.uint16) * 257)),
        "film-rgba.png": png(Image.fromarray(rgba, "RGBA")),
        "film-copy.jpeg": data,
        "other.jpeg": fixture_images()[4].read_bytes(),
        "empty.jpeg": b"",
        "truncated.jpeg": data[: len(data) // 2],
        "notes.png": b"ward round notes, not an image\n",
        "huge.png": png(Image.new("L", (600, 600))),
        "tiny.png": png(Image.new("L", (50, 50), 100)),
    }


EXPECTED_FAILURES = {
    "empty.jpeg": "empty file (0 bytes)",
    "truncated.jpeg": "truncated or corrupt image data: image file is truncated",
    "notes.png": "not a PNG, JPEG or DICOM file",
    "huge.png": f"image is 600x600 = 360,000 pixels, over the limit of {MAX_PIXELS:,}",
    "tiny.png": "image is 50x50 pixels; films under 64 px are not scored",
}


def test_every_dropped_file_is_accounted_for_and_bad_ones_are_quarantined(tmp_path, db_url, bundle):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url,
                        stable_seconds=0.2, max_image_pixels=MAX_PIXELS)
    settings.ensure_dirs()
    files = inbox_files()
    for name, data in files.items():  # dropped while the service was down
        (settings.inbox / name).write_bytes(data)

    enqueued: list[int] = []
    with Ingester(settings, enqueued.append):
        wait_for(lambda: not any(settings.inbox.iterdir()), 30, message="inbox to empty")
    outcome = process_studies(enqueued, bundle=bundle, settings=settings, worker="test")

    with session_scope(db_url) as session:
        rows = {s.source_name: s for s in session.scalars(select(Study))}
    assert sorted(rows) == sorted(files)  # no file silently dropped
    # The two identical copies are ingested in parallel: whichever committed first is the original.
    original, dup = sorted((rows["film.jpeg"], rows["film-copy.jpeg"]), key=lambda s: s.id)
    assert (dup.status, dup.duplicate_of_id, dup.score) == (Status.DUPLICATE, original.id, None)
    assert sorted(enqueued) == sorted(s.id for s in rows.values() if s not in (dup, rows["empty.jpeg"]))
    assert set(outcome.values()) == {"scored", "failed"}

    for name, reason in EXPECTED_FAILURES.items():
        study = rows[name]
        assert study.status == Status.FAILED, name
        assert study.error.startswith(reason), (name, study.error)
        assert study.stored_path.startswith("quarantine/"), name
        kept = settings.data_dir / study.stored_path
        assert kept.read_bytes() == files[name], name
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == study.sha256
        assert (study.score, study.logit, study.scored_at, study.heatmap_path) == (None, None, None, None)
    # Quarantined bytes left the archive.
    assert [p for n in EXPECTED_FAILURES for p in settings.archive_dir.rglob(f"{rows[n].sha256}*")] == []

    scored = [original, rows["film-16bit.png"], rows["film-rgba.png"], rows["other.jpeg"]]
    for study in scored:
        assert study.status == Status.SCORED, (study.source_name, study.error)
        assert study.error is None
        assert math.isclose(study.score, 1 / (1 + math.exp(-study.logit)), rel_tol=1e-9)  # temperature 1
        assert (study.threshold, study.flagged) == (0.5, study.score >= 0.5)
        assert (study.model_version, study.calibration_version) == (bundle.version, "temperature-test0")
        with Image.open(settings.data_dir / study.heatmap_path) as heat:
            assert heat.size == (7, 7)  # the CAM grid, whatever the film's size
    # 16-bit and RGBA encodings of the same film decode to the same pixels, hence the same logit.
    logits = [original.logit, rows["film-16bit.png"].logit, rows["film-rgba.png"].logit]
    assert max(logits) - min(logits) < 1e-4, logits
    assert abs(rows["other.jpeg"].logit - logits[0]) > 1e-4


    # Running the same tasks again changes nothing.
    again = process_studies(enqueued, bundle=bundle, settings=settings, worker="test")
    assert set(again.values()) == {"skipped"}
    with session_scope(db_url) as session:
        after = {s.source_name: (s.status, s.scored_at, s.logit) for s in session.scalars(select(Study))}
    assert after == {n: (s.status, s.scored_at, s.logit) for n, s in rows.items()}


def test_a_duplicate_of_a_quarantined_file_is_still_recorded(tmp_path, db_url, bundle):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url,
                        stable_seconds=0.0)
    settings.ensure_dirs()
    enqueued: list[int] = []
    (settings.inbox / "bad.png").write_bytes(b"garbage")
    first = ingest_file(settings.inbox / "bad.png", settings=settings, enqueue=enqueued.append)
    assert process_studies(enqueued, bundle=bundle, settings=settings, worker="test") == {first: "failed"}
    (settings.inbox / "bad-again.png").write_bytes(b"garbage")
    second = ingest_file(settings.inbox / "bad-again.png", settings=settings, enqueue=enqueued.append)
    with session_scope(db_url) as session:
        a, b = session.get(Study, first), session.get(Study, second)
        assert (a.status, a.error) == (Status.FAILED, "not a PNG, JPEG or DICOM file")
        assert (b.status, b.duplicate_of_id) == (Status.DUPLICATE, first)
        assert (settings.data_dir / a.stored_path).read_bytes() == b"garbage"
        assert (settings.data_dir / b.stored_path).read_bytes() == b"garbage"
    assert enqueued == [first]
