"""DICOM through the real service path: inbox (or C-STORE) → ingest → guard → scoring → worklist → feedback export.

Every test runs on SQLite and on an isolated Postgres database (tests.migrated_db).
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import stat
import uuid

import numpy as np
import pytest
from alembic import command
from pydicom import dcmread, uid
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from core import repository as repo
from core import worklist as wl
from core.db import get_engine, session_scope
from core.feedback import COLUMNS, feedback_csv, read_feedback_csv
from core.intake import claim
from core.intake.dicom_listener import start_listener, stop_listener
from core.intake.ingest import ingest_file, scan_inbox
from core.intake.watcher import Ingester
from core.migrate import alembic_config
from core.ml.bundle import load_bundle
from core.models import Status, Study
from core.pipeline import process_studies
from core.pseudonym import SALT_FILE, load_salt, patient_key
from core.settings import Settings
from tests.conftest import fixture_images
from tests.dicom_samples import ACCESSION, PATIENT_ID, PATIENT_NAME, compressed, film, make_dataset, to_bytes
from tests.services import wait_for
from tests.test_dicom_listener import instances, send

SALT = "test-salt-0123456789abcdef0123456789abcdef"
PHI = (PATIENT_ID, PATIENT_NAME, "Testperson", "Alice", ACCESSION)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, device="cpu")


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url, stable_seconds=0.2,
                 pseudonym_salt=SALT)
    s.ensure_dirs()
    return s


def frontal(index: int = 0, **elements):
    """A DX chest PA film from a fixture image; the identity window reproduces its 8-bit pixels exactly."""
    return make_dataset(film(fixture_images()[index]), WindowCenter=128, WindowWidth=256, **elements)


def cr_monochrome1(index: int = 1, **elements):
    v = film(fixture_images()[index]).astype(np.uint16) * 16
    return make_dataset(4095 - v, modality="CR", photometric="MONOCHROME1", bits_stored=12, **elements)


def drop(settings: Settings, files: dict[str, bytes]) -> tuple[dict[str, int], list[int]]:
    """Drops files one by one and ingests each with the real ingest_file; returns ids by name and enqueued ids."""
    enqueued: list[int] = []
    ids = {}
    for name, data in files.items():
        path = settings.inbox / name
        path.write_bytes(data)
        ids[name] = ingest_file(path, settings=settings, enqueue=enqueued.append, wait=False)
    return ids, enqueued


def rows(settings: Settings) -> dict[int, Study]:
    with session_scope(settings.database_url) as session:
        return {s.id: s for s in session.scalars(select(Study))}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def identity_of(ds) -> dict:
    return {"sop_instance_uid": ds.SOPInstanceUID, "sop_class_uid": ds.SOPClassUID,
            "study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
            "accession_number": ACCESSION, "patient_id": PATIENT_ID, "patient_name": PATIENT_NAME,
            "patient_sex": "F", "patient_age": "045Y", "study_date": "20240102", "study_time": "101530",
            "modality": ds.Modality, "body_part_examined": ds.BodyPartExamined, "view_position": ds.ViewPosition}


# --- scored, refused, failed ------------------------------------------------------------------------------


def test_dx_and_cr_films_are_scored_with_identity_stored_and_the_archive_unchanged(settings, bundle):
    dx, cr = frontal(0), cr_monochrome1(1, ViewPosition="AP")
    files = {"dx-no-extension": to_bytes(dx), "cr.DCM": to_bytes(cr),
             "film.jpeg": fixture_images()[0].read_bytes()}
    for name, data in files.items():  # dropped while the service was down; found by the real watchdog ingester
        (settings.inbox / name).write_bytes(data)
    enqueued: list[int] = []
    with Ingester(settings, enqueued.append):
        wait_for(lambda: not any(settings.inbox.iterdir()), 30, message="inbox to empty")
    assert len(enqueued) == 3
    outcome = process_studies(enqueued, bundle=bundle, settings=settings, worker="test")
    assert set(outcome.values()) == {"scored"}

    by_name = {s.source_name: s for s in rows(settings).values()}
    for name, ds in (("dx-no-extension", dx), ("cr.DCM", cr)):
        study = by_name[name]
        assert study.status == Status.SCORED, study.error
        assert {k: getattr(study, k) for k in repo.IDENTITY_FIELDS} == identity_of(ds)
        # The archive keeps exactly the bytes received, under their hash.
        kept = (settings.data_dir / study.stored_path).read_bytes()
        assert kept == files[name] and sha(kept) == study.sha256
        assert study.stored_path.startswith(f"archive/{study.sha256[:2]}/")
        assert (study.width, study.height) == film(fixture_images()[0 if ds is dx else 1]).shape[::-1]
        assert math.isclose(study.score, 1 / (1 + math.exp(-study.logit)), rel_tol=1e-9)
    jpeg = by_name["film.jpeg"]
    assert {k: getattr(jpeg, k) for k in repo.IDENTITY_FIELDS} == dict.fromkeys(repo.IDENTITY_FIELDS)
    # The DX reproduces the JPEG's pixels, so the model sees the same film.
    assert by_name["dx-no-extension"].logit == pytest.approx(jpeg.logit, abs=1e-5)
    assert by_name["cr.DCM"].logit != pytest.approx(jpeg.logit, abs=1e-3)


GUARDED = {
    "ct.dcm": (lambda: frontal(0, modality="CT"), "modality CT is not scored"),
    "lateral.dcm": (lambda: frontal(2, ViewPosition="LAT"),
                    "lateral view (ViewPosition LAT): the model reads frontal (PA/AP) films only"),
    "abdomen.dcm": (lambda: frontal(3, BodyPartExamined="ABDOMEN"), "body part ABDOMEN is not chest"),
}


def test_guard_lists_ct_lateral_and_non_chest_as_refused_and_keeps_them_archived(settings, bundle):
    files = {name: to_bytes(build()) for name, (build, _) in GUARDED.items()}
    ids, enqueued = drop(settings, files)
    assert enqueued == []  # never sent to the model
    # Not claimable either: a stray task for one of them changes nothing.
    assert process_studies(list(ids.values()), bundle=bundle, settings=settings, worker="t") == \
        dict.fromkeys(ids.values(), "skipped")
    studies = rows(settings)
    for name, (_, reason) in GUARDED.items():
        study = studies[ids[name]]
        assert study.status == Status.REFUSED and study.error.startswith(reason), (name, study.error)
        assert (study.score, study.logit, study.heatmap_path) == (None, None, None)
        assert study.stored_path.startswith("archive/")
        assert (settings.data_dir / study.stored_path).read_bytes() == files[name]
        assert study.patient_id == PATIENT_ID  # listed with its identity
    assert list(settings.quarantine_dir.iterdir()) == []
    with session_scope(settings.database_url) as session:
        refused = wl.section(session, "refused", max_wait_minutes=60)
        assert sorted(e.study.id for e in refused.entries) == sorted(ids.values()) and refused.total == 3
        assert wl.section(session, "failed", max_wait_minutes=60).total == 0
        assert wl.status_strip(session, worker_alive_seconds=60, max_wait_minutes=60).refused == 3


def test_worker_guard_backstop_records_refused_not_failed(settings, bundle):
    """A lateral that reached the queue anyway (e.g. ingested by an older version) is refused by the worker."""
    data = to_bytes(frontal(2, ViewPosition="RL"))
    stored = f"archive/{sha(data)[:2]}/{sha(data)}.dcm"
    (settings.data_dir / stored).parent.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / stored).write_bytes(data)
    with session_scope(settings.database_url) as session:
        sid = repo.create_study(session, source_name="old.dcm", sha256=sha(data), size_bytes=len(data),
                                stored_path=stored).id
    assert process_studies([sid], bundle=bundle, settings=settings, worker="t") == {sid: "refused"}
    study = rows(settings)[sid]
    assert (study.status, study.stored_path) == (Status.REFUSED, stored)
    assert study.error.startswith("lateral view (ViewPosition RL)")
    assert (settings.data_dir / stored).read_bytes() == data


def test_multi_frame_colour_and_corrupt_dicom_fail_with_the_reason_and_are_quarantined(settings, bundle):
    one = film(fixture_images()[0])
    whole = to_bytes(frontal(0))
    rng = np.random.default_rng(0)
    files = {
        "multi.dcm": to_bytes(make_dataset(np.stack([one, one]))),
        "colour.dcm": to_bytes(make_dataset(np.stack([one] * 3, axis=-1), photometric="RGB")),
        "garbage.dcm": b"\0" * 128 + b"DICM" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "cut.dcm": whole[:-5000],  # header intact: fails in the worker, at decoding
    }
    expected = {"multi.dcm": "multi-frame DICOM (2 frames) is not supported",
                "colour.dcm": "colour DICOM (RGB) is not supported",
                "garbage.dcm": "unreadable DICOM header",
                "cut.dcm": "unreadable pixel data"}
    ids, enqueued = drop(settings, files)
    assert sorted(enqueued) == sorted(ids[n] for n in ("multi.dcm", "colour.dcm", "cut.dcm"))
    assert set(process_studies(enqueued, bundle=bundle, settings=settings, worker="t").values()) == {"failed"}
    studies = rows(settings)
    for name, reason in expected.items():
        study = studies[ids[name]]
        assert study.status == Status.FAILED and study.error.startswith(reason), (name, study.error)
        assert study.stored_path.startswith("quarantine/"), name
        assert (settings.data_dir / study.stored_path).read_bytes() == files[name]
    assert studies[ids["garbage.dcm"]].sop_instance_uid is None
    assert studies[ids["multi.dcm"]].sop_instance_uid is not None  # the header was fine: identity kept
    assert [p for p in settings.archive_dir.rglob("*") if p.is_file()] == []


# --- deduplication by SOP Instance UID --------------------------------------------------------------------


@pytest.mark.parametrize("resend", ["byte-identical", "re-encoded"])
def test_same_sop_instance_sent_twice_is_one_study_and_one_duplicate(settings, bundle, resend):
    ds = frontal(0)
    first = to_bytes(ds)
    again = first if resend == "byte-identical" else to_bytes(compressed(frontal(0, SOPInstanceUID=ds.SOPInstanceUID,
                                                                         StudyInstanceUID=ds.StudyInstanceUID,
                                                                         SeriesInstanceUID=ds.SeriesInstanceUID),
                                                                  uid.RLELossless))
    assert (first == again) == (resend == "byte-identical")
    ids, enqueued = drop(settings, {"a.dcm": first, "b.dcm": again})
    assert enqueued == [ids["a.dcm"]]
    studies = rows(settings)
    original, dup = studies[ids["a.dcm"]], studies[ids["b.dcm"]]
    assert (dup.status, dup.duplicate_of_id, dup.sop_instance_uid) == (Status.DUPLICATE, original.id, None)
    assert original.sop_instance_uid == ds.SOPInstanceUID
    if resend == "byte-identical":
        assert dup.error == f"byte-identical duplicate of study {original.id} (a.dcm)"
        assert dup.stored_path == original.stored_path
    else:
        assert dup.error == (f"the same DICOM instance (SOP Instance UID {ds.SOPInstanceUID}) as study "
                             f"{original.id}, received again")
        assert (settings.data_dir / dup.stored_path).read_bytes() == again  # what was sent is kept too
    assert process_studies(enqueued, bundle=bundle, settings=settings, worker="t") == {original.id: "scored"}
    with session_scope(settings.database_url) as session:
        assert wl.section(session, "unread", max_wait_minutes=60).total == 1
        assert [e.study.id for e in wl.section(session, "duplicates", max_wait_minutes=60).entries] == [dup.id]


def test_concurrent_ingest_of_one_instance_is_resolved_by_the_unique_index(settings, monkeypatch, caplog):
    ds = frontal(0)
    ids, _ = drop(settings, {"a.dcm": to_bytes(ds)})
    # The database refuses a second row holding the same SOP Instance UID, whatever the code does.
    with pytest.raises(IntegrityError):
        with session_scope(settings.database_url) as session:
            session.add(Study(source_name="x", sha256="0" * 64, size_bytes=1, stored_path="x", status="queued",
                              sop_instance_uid=ds.SOPInstanceUID))
    # Another ingester commits the instance just after our look-up: the insert fails, the retry finds it.
    real, calls = repo.find_by_sop, []

    def late_lookup(session, *, sop_instance_uid):
        calls.append(sop_instance_uid)
        return None if len(calls) == 1 else real(session, sop_instance_uid=sop_instance_uid)

    monkeypatch.setattr(repo, "find_by_sop", late_lookup)
    caplog.set_level(logging.INFO, logger="core.intake.ingest")
    again = to_bytes(compressed(frontal(0, SOPInstanceUID=ds.SOPInstanceUID), uid.RLELossless))
    ids2, enqueued = drop(settings, {"b.dcm": again})
    assert calls == [ds.SOPInstanceUID] * 2 and enqueued == []
    dup = rows(settings)[ids2["b.dcm"]]
    assert (dup.status, dup.duplicate_of_id) == (Status.DUPLICATE, ids["a.dcm"])
    assert f"SOP {ds.SOPInstanceUID} was recorded by another ingester meanwhile" in caplog.text
    assert len(rows(settings)) == 2 and not any(settings.inbox.iterdir())


# --- one worklist row per DICOM study ---------------------------------------------------------------------


def test_images_of_one_study_are_one_worklist_row_risk_is_the_highest_frontal_score(settings, bundle):
    pa = frontal(0, ViewPosition="PA")
    study_uids = {"StudyInstanceUID": pa.StudyInstanceUID}
    ap = frontal(4, ViewPosition="AP", **study_uids)
    lateral = frontal(5, ViewPosition="LL", **study_uids)  # never scored, so never counts
    files = {"pa.dcm": to_bytes(pa), "ap.dcm": to_bytes(ap), "lat.dcm": to_bytes(lateral),
             "film.jpeg": fixture_images()[1].read_bytes()}
    ids, enqueued = drop(settings, files)
    assert sorted(enqueued) == sorted(ids[n] for n in ("pa.dcm", "ap.dcm", "film.jpeg"))
    process_studies(enqueued, bundle=bundle, settings=settings, worker="t")
    studies = rows(settings)
    frontals = [studies[ids["pa.dcm"]], studies[ids["ap.dcm"]]]
    assert [s.status for s in frontals] == [Status.SCORED] * 2 and frontals[0].score != frontals[1].score
    assert studies[ids["lat.dcm"]].status == Status.REFUSED
    best = max(frontals, key=lambda s: s.score)

    with session_scope(settings.database_url) as session:
        unread = wl.section(session, "unread", max_wait_minutes=60)
        assert unread.total == 2 and len(unread.entries) == 2
        [row] = [e for e in unread.entries if e.study.study_instance_uid == pa.StudyInstanceUID]
        assert row.study.id == best.id and row.score == best.score == max(s.score for s in frontals)
        assert sorted(s.id for s in row.images) == sorted(s.id for s in frontals)
        assert row.flagged == any(s.score >= 0.5 for s in frontals)
        # Rows are in reading order by the group's risk (no row is overdue here).
        jpeg = studies[ids["film.jpeg"]]
        expected = sorted([(row.tier, -row.score, row.study.id), (0 if jpeg.flagged else 2, -jpeg.score, jpeg.id)])
        assert [e.study.id for e in unread.entries] == [i for *_, i in expected]
        # Any image, the refused lateral included, leads to the same row and the same study page.
        for sid in (ids["pa.dcm"], ids["ap.dcm"]):
            assert wl.row_for(session, study_id=sid, max_wait_minutes=60).study.id == best.id
        assert [s.id for s in repo.group_images(session, study_id=ids["lat.dcm"])] == \
            sorted(ids[n] for n in ("pa.dcm", "ap.dcm", "lat.dcm"))
        strip = wl.status_strip(session, worker_alive_seconds=60, max_wait_minutes=60)
        assert (strip.unread, strip.refused) == (2, 1)

        # The reader records one finding for the study: it lands on each scored image, not on the lateral.
        marked = repo.record_study_feedback(session, study_id=ids["lat.dcm"], finding="pneumonia", comment="RLL",
                                            reviewer="dr a")
        assert sorted(s.id for s in marked) == sorted(s.id for s in frontals)
        repo.record_study_feedback(session, study_id=jpeg.id, finding="normal", comment=None, reviewer="dr a")
    with session_scope(settings.database_url) as session:
        assert wl.section(session, "unread", max_wait_minutes=60).total == 0
        read = wl.section(session, "read", max_wait_minutes=60)
        assert read.total == 2 and sorted(len(e.images) for e in read.entries) == [1, 2]
        assert session.get(Study, ids["lat.dcm"]).finding is None
        export = feedback_csv(session, salt=SALT.encode())

    # One export row per scored image, each with its own logit; the patient only as a salted key.
    lines = list(csv.DictReader(export.splitlines()))
    assert list(lines[0]) == COLUMNS and COLUMNS[-1] == "patient_key"
    by_id = {int(r["study_id"]): r for r in lines}
    assert sorted(by_id) == sorted([*(s.id for s in frontals), jpeg.id])
    key = hmac.new(SALT.encode(), PATIENT_ID.encode(), hashlib.sha256).hexdigest()[:16]
    for s in frontals:
        assert (by_id[s.id]["patient_key"], by_id[s.id]["finding"]) == (key, "pneumonia")
        assert float(by_id[s.id]["logit"]) == s.logit
    assert by_id[jpeg.id]["patient_key"] == ""
    for value in (*PHI, pa.StudyInstanceUID, pa.SOPInstanceUID):
        assert value not in export
    path = settings.data_dir / "feedback.csv"
    path.write_text(export)
    logits, labels, _ = read_feedback_csv(path)
    assert sorted(labels) == [0, 1, 1] and len(logits) == 3


def test_worklist_groups_in_sql_by_highest_score_and_any_flag(db_url):
    """Reading order over groups, decided in SQL: a study's risk is its best image's; one flagged image flags it."""
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    uid_a = "1.2.826.0.1.3680043.8.498.1"

    def scored(session, name, score, minutes_ago, study_uid=None, threshold=0.65):
        identity = {"sop_instance_uid": f"{uid_a}.{uuid.uuid4().int % 10**12}", "study_instance_uid": study_uid,
                    "patient_id": PATIENT_ID} if study_uid else None
        st = repo.create_study(session, source_name=name, sha256=uuid.uuid4().hex * 2, size_bytes=1,
                               stored_path=name, received_at=now - dt.timedelta(minutes=minutes_ago),
                               identity=identity)
        token = repo.claim_study(session, study_id=st.id, worker="w")
        repo.save_score(session, study_id=st.id, token=token, logit=0.0, model_version="m", score=score,
                        threshold=threshold, calibration_version="c", width=1, height=1, heatmap_path="h",
                        timings={})
        return st.id

    with session_scope(db_url) as s:
        a_low = scored(s, "a-low", 0.30, 90, uid_a)
        a_high = scored(s, "a-high", 0.70, 5, uid_a)
        single_mid = scored(s, "single", 0.60, 10)
        b_low = scored(s, "b-low", 0.20, 100, "1.2.3.4")  # overdue
        b_high = scored(s, "b-high", 0.40, 1, "1.2.3.4")
    with session_scope(db_url) as s:
        entries = wl.unread(s, max_wait_minutes=60, now=now)
        assert [e.study.id for e in entries] == [a_high, b_high, single_mid]
        assert [(e.tier, e.overdue, e.flagged) for e in entries] == [(0, True, True), (1, True, False),
                                                                     (2, False, False)]
        assert [[i.id for i in e.images] for e in entries] == [[a_high, a_low], [b_high, b_low], [single_mid]]
        assert entries[0].score == 0.70 and entries[0].waiting_seconds == 90 * 60  # since its first image
        assert wl.section(s, "unread", max_wait_minutes=60, now=now, limit=1).total == 3
        assert [e.study.id for e in wl.unread(s, max_wait_minutes=60, now=now, limit=2)] == [a_high, b_high]
        strip = wl.status_strip(s, worker_alive_seconds=60, max_wait_minutes=60, now=now)
        assert (strip.unread, strip.overdue) == (3, 2)
        everything = [i.id for e in wl.all_studies(s, max_wait_minutes=60, now=now) for i in e.images]
        assert sorted(everything) == sorted(s.scalars(select(Study.id)))


# --- PHI hygiene ------------------------------------------------------------------------------------------


def test_no_patient_identifier_in_logs_during_ingest_and_scoring(settings, bundle, caplog):
    caplog.set_level(logging.DEBUG)
    named = f"{PATIENT_NAME.replace('^', '_')}_{PATIENT_ID}.dcm"  # senders do name files after patients
    files = {named: to_bytes(frontal(0)), "lat.dcm": to_bytes(frontal(1, ViewPosition="LAT")),
             "multi.dcm": to_bytes(make_dataset(np.stack([film(fixture_images()[0])] * 2))),
             "garbage.dcm": b"\0" * 128 + b"DICM" + PATIENT_ID.encode() * 50}
    ids, enqueued = drop(settings, files)
    outcome = process_studies(enqueued, bundle=bundle, settings=settings, worker="t")
    assert sorted(outcome.values()) == ["failed", "scored"]
    assert any(f"study {ids[named]}" in r.getMessage() for r in caplog.records)
    for value in PHI:
        assert value not in caplog.text
    studies = rows(settings)
    assert f"SOP {studies[ids[named]].sop_instance_uid}" in caplog.text
    for study in studies.values():  # reasons shown to users carry no identifiers either
        assert not any(v in (study.error or "") for v in PHI)


def test_a_database_error_during_ingest_logs_no_patient_values_and_loses_nothing(settings, monkeypatch, caplog):
    ds = frontal(0)
    drop(settings, {"a.dcm": to_bytes(ds)})
    # The look-up always misses (a broken invariant): every insert of the resent instance hits the unique index.
    monkeypatch.setattr(repo, "find_by_sop", lambda session, *, sop_instance_uid: None)
    caplog.set_level(logging.DEBUG)
    again = settings.inbox / "again.dcm"
    data = to_bytes(compressed(frontal(0, SOPInstanceUID=ds.SOPInstanceUID), uid.RLELossless))
    again.write_bytes(data)
    assert scan_inbox(settings=settings, enqueue=lambda sid: None) == []
    assert "could not ingest" in caplog.text and "IntegrityError" in caplog.text
    for value in PHI:  # the failed INSERT's parameters are not quoted in the error
        assert value not in caplog.text
    # Left, whole, in the claim folder, which the next scan or sweep ingests again.
    assert [(p.name, p.read_bytes()) for p in claim.leftovers(settings.inbox)] == [("again.dcm", data)]
    assert not again.exists() and len(rows(settings)) == 1


def test_pseudonym_salt_is_generated_once_private_and_stable(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox")
    salt = load_salt(settings)
    path = settings.data_dir / SALT_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(salt) >= 32
    assert load_salt(settings) == salt == load_salt(Settings(data_dir=tmp_path / "var"))
    other = load_salt(Settings(data_dir=tmp_path / "other"))
    assert other != salt
    assert load_salt(Settings(data_dir=tmp_path / "var", pseudonym_salt=SALT)) == SALT.encode()
    key = patient_key(salt, PATIENT_ID)
    assert len(key) == 16 and int(key, 16) >= 0 and key == patient_key(salt, PATIENT_ID)
    assert key != patient_key(other, PATIENT_ID) and patient_key(salt, None) == ""
    assert key == hmac.new(salt, PATIENT_ID.encode(), hashlib.sha256).hexdigest()[:16]
    path.write_text("short")
    with pytest.raises(RuntimeError, match="no usable pseudonym salt"):
        load_salt(settings)


# --- C-STORE receiver to the worklist ---------------------------------------------------------------------


def test_c_store_to_inbox_to_ingester_to_scored(settings, bundle, caplog):
    caplog.set_level(logging.INFO)
    batch = instances(3)  # DX, CR MONOCHROME1 and JPEG 2000 DX, distinct SOP and Study UIDs
    enqueued: list[int] = []
    server = start_listener(settings, port=0, ae_title="CHESTAID", allowed=["MODALITY1", "MODALITY2"],
                            host="127.0.0.1")
    try:
        with Ingester(settings, enqueued.append):
            port = server.server_address[1]
            assert send(port, batch[:2]) == [0, 0]
            assert send(port, batch[2:], ae_title="MODALITY2") == [0]
            wait_for(lambda: len(enqueued) == 3, 30, message="three instances ingested")
    finally:
        stop_listener(server)
    assert set(process_studies(enqueued, bundle=bundle, settings=settings, worker="t").values()) == {"scored"}
    studies = sorted(rows(settings).values(), key=lambda s: s.source_name)
    assert sorted(s.sop_instance_uid for s in studies) == sorted(ds.SOPInstanceUID for ds in batch)
    for study in studies:
        assert study.status == Status.SCORED and study.source_name == f"{study.sop_instance_uid}.dcm"
        kept = dcmread(settings.data_dir / study.stored_path)
        assert kept.SOPInstanceUID == study.sop_instance_uid and study.accession_number == ACCESSION
    assert not any(settings.inbox.iterdir())
    for value in PHI:
        assert value not in caplog.text


# --- the migration ----------------------------------------------------------------------------------------


def test_migration_0003_downgrades_and_upgrades(db_url):
    cfg = alembic_config(db_url)
    with session_scope(db_url) as session:
        study = repo.create_study(session, source_name="lat.dcm", sha256="f" * 64, size_bytes=1, stored_path="x",
                                  identity={"sop_instance_uid": "1.2.3", "study_instance_uid": "1.2"})
        repo.mark_refused(session, study_id=study.id, reason="lateral view")
    get_engine(db_url).dispose()
    command.downgrade(cfg, "0002")
    engine = get_engine(db_url)
    columns = {c["name"] for c in inspect(engine).get_columns("studies")}
    assert not columns & set(repo.IDENTITY_FIELDS)
    with engine.connect() as conn:  # earlier code knows no 'refused'
        assert conn.execute(text("SELECT status, error FROM studies")).all() == [("failed", "lateral view")]
    engine.dispose()
    command.upgrade(cfg, "head")
    engine = get_engine(db_url)
    indexes = {i["name"]: i for i in inspect(engine).get_indexes("studies")}
    assert indexes["ix_studies_sop_instance_uid"]["unique"]
    assert {"ix_studies_study_instance_uid", "ix_studies_accession_number", "ix_studies_patient_id",
            "ix_studies_series_instance_uid"} <= set(indexes)
    engine.dispose()
