"""max_file_bytes in the worker's load step and in the web image view: over-size films are never read."""
from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.db import get_engine, session_scope
from core.intake.ingest import ingest_file
from core.migrate import upgrade
from core.ml.bundle import load_bundle
from core.models import Status, Study
from core.pipeline import process_studies
from core.settings import Settings
from tests.conftest import fixture_images
from tests.dicom_samples import film
from tests.test_web import add_user, sign_in
from web.app import create_app


def ingest(settings: Settings, name: str, data: bytes) -> int:
    """Ingests one file under the (default, generous) ingest cap; returns its study id."""
    (settings.inbox / name).write_bytes(data)
    study_id = ingest_file(settings.inbox / name, settings=settings, enqueue=lambda _id: None, wait=False)
    assert study_id is not None
    return study_id


def test_the_worker_refuses_a_stored_file_over_the_cap_and_quarantines_it(tmp_path, db_url, bundle_dir):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url)
    settings.ensure_dirs()
    big, small = fixture_images()[5], fixture_images()[4]  # 9,177 and 6,863 bytes
    ids = {ingest(settings, "big.jpeg", big.read_bytes()): big, ingest(settings, "small.jpeg", small.read_bytes()): small}
    # The cap was lowered after ingest (or the archived file grew): the worker enforces it on its own.
    capped = settings.model_copy(update={"max_file_bytes": 8_000})
    outcome = process_studies(list(ids), bundle=load_bundle(bundle_dir, device="cpu"), settings=capped, worker="t")
    big_id, small_id = list(ids)
    assert outcome == {big_id: "failed", small_id: "scored"}
    with session_scope(db_url) as session:
        failed, scored = session.get(Study, big_id), session.get(Study, small_id)
        assert (failed.status, failed.error) == (Status.FAILED, "file is 9,177 bytes, over the limit of 8,000")
        assert failed.stored_path.startswith("quarantine/") and failed.score is None
        assert (settings.data_dir / failed.stored_path).read_bytes() == big.read_bytes()  # kept, byte for byte
        assert scored.status == Status.SCORED and scored.error is None


@pytest.fixture
def web_site(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", inbox=tmp_path / "inbox")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    add_user(settings, "nina", "nurse")
    yield settings, ingest(settings, "film.jpeg", fixture_images()[5].read_bytes())
    get_engine(settings.database_url).dispose()


def test_the_image_view_answers_a_film_over_the_cap_with_a_clear_422(web_site):
    settings, study_id = web_site
    with TestClient(create_app(settings)) as client:
        sign_in(client, "nina")
        shown = client.get(f"/studies/{study_id}/image")
        assert shown.status_code == 200 and Image.open(io.BytesIO(shown.content)).size == (286, 160)
    with TestClient(create_app(settings.model_copy(update={"max_file_bytes": 9_000}))) as client:
        sign_in(client, "nina")
        refused = client.get(f"/studies/{study_id}/image")
    assert refused.status_code == 422
    assert refused.text == "film cannot be displayed: file is 9,177 bytes, over the limit of 9,000"


def test_the_image_view_answers_an_undecodable_archived_file_with_422_not_500(web_site):
    settings, study_id = web_site
    with session_scope(settings.database_url) as session:
        stored = settings.data_dir / session.get(Study, study_id).stored_path
    # A TIFF where the film was (a swapped disk, a bad restore), with 22 bytes spliced into its first IFD: a
    # case from the fuzz run on which Pillow's TIFF reader raises TypeError ("Missing dimensions"), which used
    # to escape as a 500. Chest-Aid now refuses the format before any TIFF code runs.
    buf = io.BytesIO()
    Image.fromarray(film(fixture_images()[2])).save(buf, "TIFF")
    tiff = buf.getvalue()
    stored.write_bytes(tiff[:101] + bytes.fromhex("3b904282a13228eba0828c5d9ac3d4bd29b7ce30d210") + tiff[101:])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        sign_in(client, "nina")
        r = client.get(f"/studies/{study_id}/image")
    assert (r.status_code, r.text) == (422, "film cannot be displayed: not a PNG, JPEG or DICOM file")
