"""Intake faults ("no film lost"): a name reused while the first film is recorded, a sender still
writing after the claim, links and pipes in the inbox, oversize files, and resends of failed or refused
DICOM instances. Real files, the real ingest_file, real databases (SQLite and PostgreSQL)."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from core import repository as repo
from core.db import session_scope
from core.intake import claim
from core.intake import ingest
from core.intake.ingest import ingest_file, scan_inbox
from core.ml.bundle import load_bundle
from core.models import Status, Study
from core.pipeline import process_studies
from core.settings import Settings
from tests.conftest import fixture_images
from tests.dicom_samples import film, make_dataset, to_bytes


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url, stable_seconds=0.2)
    s.ensure_dirs()
    return s


def studies(settings: Settings) -> list[Study]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_archive_matches_records(settings: Settings) -> None:
    """Every kept archive/quarantine file holds exactly the bytes its recorded sha256 names."""
    for study in studies(settings):
        if study.sha256:
            assert sha((settings.data_dir / study.stored_path).read_bytes()) == study.sha256, study.id
    for path in list(settings.archive_dir.rglob("*")) + list(settings.quarantine_dir.rglob("*")):
        assert not path.is_symlink(), path


# --- 2. a replaced file, a slow writer -------------------------------------------------------------------


def test_a_film_renamed_onto_the_same_name_while_the_first_is_recorded_becomes_its_own_study(settings,
                                                                                            monkeypatch):
    first, second = (p.read_bytes() for p in fixture_images()[:2])
    path = settings.inbox / "film.jpeg"
    path.write_bytes(first)
    real, renamed = repo.create_study, threading.Event()

    def rename_in_a_new_film(session, **kwargs):
        if not renamed.is_set():
            # The sender uploads the next film under the same name while the first is being recorded.
            renamed.set()
            (settings.inbox / "upload.part").write_bytes(second)
            os.replace(settings.inbox / "upload.part", path)
        return real(session, **kwargs)

    monkeypatch.setattr(repo, "create_study", rename_in_a_new_film)
    enqueued: list[int] = []
    one = ingest_file(path, settings=settings, enqueue=enqueued.append, wait=False)
    assert path.read_bytes() == second  # the new film was not deleted with the first
    [two] = scan_inbox(settings=settings, enqueue=enqueued.append)
    rows = studies(settings)
    assert [(s.id, s.source_name, s.sha256, s.status) for s in rows] == [
        (one, "film.jpeg", sha(first), Status.QUEUED), (two, "film.jpeg", sha(second), Status.QUEUED)]
    assert enqueued == [one, two]
    assert [(settings.data_dir / s.stored_path).read_bytes() for s in rows] == [first, second]
    assert list(settings.inbox.iterdir()) == []  # nothing left behind, not even the claim folder
    assert_archive_matches_records(settings)


class SlowSender:
    """A sender that wrote half a film, paused past stable_seconds, and still holds the file open."""

    def __init__(self, path: Path, data: bytes):
        self.data, self.half = data, len(data) // 2
        self.fh = open(path, "wb")
        self.fh.write(data[:self.half])
        self.fh.flush()
        self.resumed = False

    def resume(self) -> None:
        if not self.resumed:
            self.resumed = True
            self.fh.write(self.data[self.half:])
            self.fh.flush()


def test_a_sender_resuming_after_the_claim_gets_its_whole_film_archived_under_the_right_hash(settings,
                                                                                          monkeypatch):
    data = b"".join(p.read_bytes() for p in fixture_images()[:2])
    path = settings.inbox / "slow.jpeg"
    sender = SlowSender(path, data)
    real = ingest.header_identity

    def resume_while_hashing(staged, **kw):
        sender.resume()  # after the stability wait, the claim and the first full read
        return real(staged, **kw)

    monkeypatch.setattr(ingest, "header_identity", resume_while_hashing)
    try:
        enqueued: list[int] = []
        sid = ingest_file(path, settings=settings, enqueue=enqueued.append)  # waits for stability first
    finally:
        sender.fh.close()
    assert sender.resumed
    [study] = studies(settings)
    assert (study.id, study.sha256, study.size_bytes, study.status) == (sid, sha(data), len(data), Status.QUEUED)
    assert (settings.data_dir / study.stored_path).read_bytes() == data
    assert enqueued == [sid] and list(settings.inbox.iterdir()) == []
    assert_archive_matches_records(settings)


def test_a_sender_resuming_after_the_study_is_recorded_loses_no_byte(settings, monkeypatch):
    data = b"".join(p.read_bytes() for p in fixture_images()[:2])
    path = settings.inbox / "slow.jpeg"
    sender = SlowSender(path, data)
    real = repo.create_study

    def resume_while_recording(session, **kwargs):
        study = real(session, **kwargs)
        sender.resume()
        return study

    monkeypatch.setattr(repo, "create_study", resume_while_recording)
    try:
        enqueued: list[int] = []
        last = ingest_file(path, settings=settings, enqueue=enqueued.append)
    finally:
        sender.fh.close()
    half, whole = studies(settings)
    # The partial copy stays recorded (it will fail as truncated); the whole film is a new study.
    assert (half.sha256, half.size_bytes) == (sha(data[:len(data) // 2]), len(data) // 2)
    assert (whole.id, whole.sha256, whole.size_bytes) == (last, sha(data), len(data))
    assert (settings.data_dir / whole.stored_path).read_bytes() == data
    assert enqueued == [half.id, whole.id] and list(settings.inbox.iterdir()) == []
    assert_archive_matches_records(settings)


# --- 3. links and other non-regular files ---------------------------------------------------------------


def test_a_symlink_swapped_in_during_the_stability_wait_is_failed_and_never_followed(settings, tmp_path,
                                                                                   monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:not for the archive\n")
    path = settings.inbox / "film.jpeg"
    path.write_bytes(fixture_images()[0].read_bytes())
    real, swapped = claim._can_open, threading.Event()

    def swap_then_check(p):
        if not swapped.is_set():  # the wait has just seen the film settle: the sender swaps in a link
            swapped.set()
            os.symlink(secret, settings.inbox / ".link")
            os.replace(settings.inbox / ".link", path)
        return real(p)

    monkeypatch.setattr(claim, "_can_open", swap_then_check)
    enqueued: list[int] = []
    sid = ingest_file(path, settings=settings, enqueue=enqueued.append)
    assert swapped.is_set()
    [study] = studies(settings)
    assert (study.id, study.status, study.error) == (sid, Status.FAILED,
                                                     "not a regular file (symbolic link); not read")
    assert (study.sha256, study.size_bytes) == ("", 0) and enqueued == []
    assert secret.read_bytes() == b"root:x:0:0:not for the archive\n"  # the target is untouched
    assert list(settings.inbox.iterdir()) == []  # the link itself is removed
    assert [p for p in settings.data_dir.rglob("*") if p.is_file() and p.read_bytes().startswith(b"root:")] == []
    assert_archive_matches_records(settings)


def test_links_pipes_and_linked_folders_in_the_inbox_are_each_a_failed_study(settings, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("secret\n")
    (tmp_path / "folder").mkdir()
    os.symlink("/dev/zero", settings.inbox / "zero.jpeg")
    os.symlink(secret, settings.inbox / "passwd.jpeg")
    os.symlink(tmp_path / "folder", settings.inbox / "folder-link")
    os.symlink(tmp_path / "missing", settings.inbox / "dangling.jpeg")
    os.mkfifo(settings.inbox / "pipe.jpeg")
    enqueued: list[int] = []
    ids = scan_inbox(settings=settings, enqueue=enqueued.append)
    rows = {s.source_name: s for s in studies(settings)}
    assert sorted(s.id for s in rows.values()) == sorted(ids) and len(ids) == 5 and enqueued == []
    for name in ("zero.jpeg", "passwd.jpeg", "folder-link", "dangling.jpeg"):
        assert (rows[name].status, rows[name].error) == (Status.FAILED, "not a regular file (symbolic link); not read")
    assert (rows["pipe.jpeg"].status, rows["pipe.jpeg"].error) == (Status.FAILED,
                                                                   "not a regular file (named pipe); not read")
    assert list(settings.inbox.iterdir()) == []
    assert secret.read_text() == "secret\n" and (tmp_path / "folder").is_dir()
    assert [p for p in settings.data_dir.rglob("*") if p.is_file() and p.suffix == ".jpeg"] == []


# --- 4. oversize files ------------------------------------------------------------------------------------


def test_an_oversize_file_is_failed_with_its_size_and_kept_unread_outside_the_archive(settings):
    settings.max_file_bytes = 1000
    data = fixture_images()[0].read_bytes()
    small = b"x" * 1000  # exactly at the limit: accepted (and later fails as not an image)
    (settings.inbox / "big.jpeg").write_bytes(data)
    (settings.inbox / "small.jpeg").write_bytes(small)
    enqueued: list[int] = []
    big_id = ingest_file(settings.inbox / "big.jpeg", settings=settings, enqueue=enqueued.append, wait=False)
    small_id = ingest_file(settings.inbox / "small.jpeg", settings=settings, enqueue=enqueued.append, wait=False)
    big, small_row = studies(settings)
    [kept] = (settings.inbox / claim.REJECT_DIR).glob("*/big.jpeg")
    assert (big.id, big.status, big.size_bytes, big.sha256) == (big_id, Status.FAILED, len(data), "")
    assert big.error == (f"file is {len(data):,} bytes, over the limit of 1,000 (max_file_bytes); not read, "
                         f"kept at {kept}")
    assert big.stored_path == kept.as_posix() and kept.read_bytes() == data
    assert (small_row.id, small_row.status, small_row.sha256) == (small_id, Status.QUEUED, sha(small))
    assert enqueued == [small_id]
    assert [p.name for p in settings.archive_dir.rglob("*") if p.is_file()] == [f"{sha(small)}.jpeg"]
    assert sorted(p.name for p in settings.inbox.iterdir()) == [claim.REJECT_DIR]


# --- 6. resends of failed and refused DICOM instances -----------------------------------------------------


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, device="cpu")


def frontal(index: int = 0, **elements):
    return make_dataset(film(fixture_images()[index]), WindowCenter=128, WindowWidth=256, **elements)


def drop(settings: Settings, name: str, data: bytes, enqueued: list[int]) -> int:
    path = settings.inbox / name
    path.write_bytes(data)
    return ingest_file(path, settings=settings, enqueue=enqueued.append, wait=False)


def by_id(settings: Settings) -> dict[int, Study]:
    return {s.id: s for s in studies(settings)}


def test_an_intact_resend_of_a_failed_instance_is_scored_and_supersedes_it(settings, bundle):
    ds = frontal(0)
    whole = to_bytes(ds)
    cut = whole[:-5000]  # header intact: queued, then fails at decoding
    enqueued: list[int] = []
    damaged = drop(settings, "a.dcm", cut, enqueued)
    assert process_studies([damaged], bundle=bundle, settings=settings, worker="t") == {damaged: "failed"}
    same = drop(settings, "a-again.dcm", cut, enqueued)  # the same damaged bytes would fail the same way
    intact = drop(settings, "a-intact.dcm", whole, enqueued)
    assert enqueued == [damaged, intact]
    assert process_studies([intact], bundle=bundle, settings=settings, worker="t") == {intact: "scored"}
    rows = by_id(settings)
    assert (rows[same].status, rows[same].duplicate_of_id) == (Status.DUPLICATE, damaged)
    assert rows[same].error == f"byte-identical duplicate of study {damaged} (a.dcm)"
    assert (rows[intact].status, rows[intact].sop_instance_uid) == (Status.SCORED, ds.SOPInstanceUID)
    assert rows[damaged].status == Status.FAILED and rows[damaged].sop_instance_uid is None
    assert rows[damaged].error.startswith("unreadable pixel data")
    assert rows[damaged].error.endswith(f"; superseded by study {intact}")
    # The scored study now holds the instance: any later copy, damaged or re-encoded, is its duplicate.
    third = drop(settings, "a-3.dcm", cut, enqueued)
    fourth = drop(settings, "a-4.dcm", to_bytes(frontal(0, SOPInstanceUID=ds.SOPInstanceUID, PatientAge="046Y")),
                  enqueued)
    rows = by_id(settings)
    assert (rows[third].status, rows[third].duplicate_of_id) == (Status.DUPLICATE, intact)
    assert (rows[fourth].status, rows[fourth].duplicate_of_id) == (Status.DUPLICATE, intact)
    assert enqueued == [damaged, intact]


def test_a_refused_instance_resent_with_a_fixed_header_is_evaluated_again(settings, bundle):
    lateral = frontal(1, ViewPosition="LL")
    fixed = frontal(1, SOPInstanceUID=lateral.SOPInstanceUID, StudyInstanceUID=lateral.StudyInstanceUID,
                    SeriesInstanceUID=lateral.SeriesInstanceUID, ViewPosition="PA")
    enqueued: list[int] = []
    refused = drop(settings, "lat.dcm", to_bytes(lateral), enqueued)
    same = drop(settings, "lat-again.dcm", to_bytes(lateral), enqueued)
    resent = drop(settings, "pa.dcm", to_bytes(fixed), enqueued)
    assert enqueued == [resent]
    assert process_studies([resent], bundle=bundle, settings=settings, worker="t") == {resent: "scored"}
    rows = by_id(settings)
    assert rows[refused].status == Status.REFUSED and rows[refused].sop_instance_uid is None
    assert rows[refused].error.endswith(f"; superseded by study {resent}")
    assert (rows[same].status, rows[same].duplicate_of_id) == (Status.DUPLICATE, refused)
    assert (rows[resent].status, rows[resent].sop_instance_uid) == (Status.SCORED, lateral.SOPInstanceUID)


def test_every_empty_file_is_its_own_failure_never_a_duplicate(settings):
    enqueued: list[int] = []
    ids = [drop(settings, f"empty-{i}.jpeg", b"", enqueued) for i in range(2)]
    rows = by_id(settings)
    assert [(rows[i].status, rows[i].error, rows[i].duplicate_of_id) for i in ids] == \
        [(Status.FAILED, "empty file (0 bytes)", None)] * 2
    assert enqueued == []


# --- at-least-once: the claim folder after a crash --------------------------------------------------------


def test_a_file_left_in_the_claim_folder_by_a_crash_is_ingested_on_the_next_scan(settings):
    data = fixture_images()[3].read_bytes()
    path = settings.inbox / "film.jpeg"
    path.write_bytes(data)
    claimed = claim.claim(path, inbox=settings.inbox)  # claimed, then the process died
    claim.finish(claimed.parent)  # (a new process has no record of the old one's claims)
    assert claimed.read_bytes() == data and not path.exists()
    assert claim.leftovers(settings.inbox) == [claimed]
    enqueued: list[int] = []
    [sid] = scan_inbox(settings=settings, enqueue=enqueued.append)
    [study] = studies(settings)
    assert (study.id, study.source_name, study.sha256, study.status) == (sid, "film.jpeg", sha(data), Status.QUEUED)
    assert enqueued == [sid] and list(settings.inbox.iterdir()) == []
