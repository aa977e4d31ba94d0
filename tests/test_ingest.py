"""The folder ingester with real watchdog on a temporary inbox, on SQLite and on PostgreSQL."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core import repository as repo
from core.db import session_scope
from core.intake.ingest import ingest_file, requeue_stale, scan_inbox
from core.intake.watcher import Ingester
from core.models import Status, Study, utcnow
from core.settings import Settings
from tests.conftest import fixture_images
from tests.services import wait_for



@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url, stable_seconds=0.3,
                 requeue_after_seconds=300)
    s.ensure_dirs()
    return s


class Recorder:
    """An enqueue callback that records, at call time, what another session sees of the study."""

    def __init__(self, settings: Settings, fail_first: int = 0):
        self.settings, self.fail_first = settings, fail_first
        self.calls: list[int] = []
        self.seen: list[tuple[int, str | None, int | None]] = []
        self.lock = threading.Lock()

    def __call__(self, study_id: int) -> None:
        with self.lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                raise ConnectionError("broker unreachable")
            with session_scope(self.settings.database_url) as session:
                study = repo.get_study(session, study_id=study_id)
                self.seen.append((study_id, study and study.status, study and study.enqueue_count))
            self.calls.append(study_id)


def studies(settings: Settings) -> list[Study]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_copied_file_is_archived_and_committed_before_it_is_enqueued(settings):
    src = fixture_images()[0]
    data = src.read_bytes()
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue):
        shutil.copy(src, settings.inbox / "film.jpeg")
        wait_for(lambda: enqueue.calls, 20, message="enqueue")
        wait_for(lambda: studies(settings)[0].enqueue_count == 1, 20, message="mark_enqueued")
    [study] = studies(settings)
    # At call time another session already saw the committed row, not yet marked as enqueued.
    assert enqueue.seen == [(study.id, Status.QUEUED, 0)]
    assert (study.source_name, study.status, study.sha256, study.size_bytes) == ("film.jpeg", Status.QUEUED,
                                                                                 sha(data), len(data))
    assert study.stored_path == f"archive/{sha(data)[:2]}/{sha(data)}.jpeg"
    assert (settings.data_dir / study.stored_path).read_bytes() == data
    assert study.enqueued_at is not None and study.enqueued_at >= study.received_at
    assert list(settings.inbox.iterdir()) == []


def test_dotfiles_temp_names_and_folders_are_ignored_and_a_renamed_file_is_taken(settings):
    films = fixture_images()
    enqueue = Recorder(settings)
    ignored = [".hidden.jpeg", "upload.jpeg.part", "scan.tmp"]
    with Ingester(settings, enqueue):
        for name in ignored:
            shutil.copy(films[1], settings.inbox / name)
        (settings.inbox / "folder").mkdir()
        shutil.copy(films[2], settings.inbox / "folder" / "inside.jpeg")
        shutil.copy(films[0], settings.inbox / "real.jpeg")
        wait_for(lambda: len(enqueue.calls) == 1, 20, message="real.jpeg")
        # The usual upload pattern: write as .part, then rename into place (a moved-in event).
        os.rename(settings.inbox / "upload.jpeg.part", settings.inbox / "upload.jpeg")
        wait_for(lambda: len(enqueue.calls) == 2, 20, message="renamed upload.jpeg")
    assert [s.source_name for s in studies(settings)] == ["real.jpeg", "upload.jpeg"]
    assert studies(settings)[1].sha256 == sha(films[1].read_bytes())
    assert sorted(p.name for p in settings.inbox.iterdir()) == [".hidden.jpeg", "folder", "scan.tmp"]
    assert (settings.inbox / "folder" / "inside.jpeg").exists()
    assert scan_inbox(settings=settings, enqueue=enqueue) == []


def test_file_still_being_written_is_read_only_when_complete(settings):
    settings.stable_seconds = 1.0
    data = b"".join(p.read_bytes() for p in fixture_images()[:2])
    chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)]
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue):
        with open(settings.inbox / "slow.jpeg", "wb") as f:
            for chunk in chunks:  # pauses well under stable_seconds: the file never looks finished early
                f.write(chunk)
                f.flush()
                time.sleep(0.1)
        wait_for(lambda: enqueue.calls, 20, message="slow.jpeg")
    [study] = studies(settings)
    assert len(chunks) >= 16  # the write took longer than stable_seconds
    assert (study.sha256, study.size_bytes) == (sha(data), len(data))
    assert (settings.data_dir / study.stored_path).read_bytes() == data
    assert enqueue.calls == [study.id]


def test_the_watcher_hears_only_the_events_it_acts_on(settings, monkeypatch):
    """A file written in 20 chunks reaches the handler as its creation and its close: not one event per write,
    nor a reader's open and close, the folder's own changes or the claim's move out of the inbox."""
    from core.intake import watcher

    heard = []
    dispatch = watcher._Handler.dispatch

    def listening(handler, event):
        heard.append((type(event).__name__, Path(os.fsdecode(event.src_path)).name))
        dispatch(handler, event)
    monkeypatch.setattr(watcher._Handler, "dispatch", listening)
    data = fixture_images()[0].read_bytes()
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue):
        with open(settings.inbox / "chunks.jpeg", "wb") as f:
            for i in range(20):
                f.write(data[i * len(data) // 20:(i + 1) * len(data) // 20])
                f.flush()
        with contextlib.suppress(FileNotFoundError):  # a reader opens and closes it (unless already claimed)
            (settings.inbox / "chunks.jpeg").read_bytes()
        wait_for(lambda: enqueue.calls, 20, message="chunks.jpeg")
    assert heard == [("FileCreatedEvent", "chunks.jpeg"), ("FileClosedEvent", "chunks.jpeg")]
    assert [(s.source_name, s.sha256) for s in studies(settings)] == [("chunks.jpeg", sha(data))]


def test_a_claim_moving_a_film_out_does_not_hold_back_the_next_film(settings, monkeypatch):
    """Each claim renames a film out of the inbox. watchdog holds an unpaired IN_MOVED_FROM at the head of its
    queue, waiting for its IN_MOVED_TO, and every later event waits behind it (0.5 s in watchdog; 60 s here, so
    that the wait cannot be missed): the inbox watch leaves IN_MOVED_FROM out, so the film renamed into the inbox
    after the claim is ingested at once."""
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    monkeypatch.setattr(InotifyMoveEventGrouper, "delay", 60.0)
    films = fixture_images()[:2]
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue):
        shutil.copy(films[0], settings.inbox / "first.jpeg")
        wait_for(lambda: enqueue.calls, 20, message="first.jpeg")  # claimed: moved out of the inbox
        shutil.copy(films[1], settings.inbox / ".second.jpeg.part")
        os.rename(settings.inbox / ".second.jpeg.part", settings.inbox / "second.jpeg")
        wait_for(lambda: len(enqueue.calls) == 2, 20, message="second.jpeg")
    assert [(s.source_name, s.sha256) for s in studies(settings)] == [("first.jpeg", sha(films[0].read_bytes())),
                                                                     ("second.jpeg", sha(films[1].read_bytes()))]


def test_a_film_renamed_into_the_inbox_is_taken_without_the_stability_wait(settings):
    """Renaming a finished temporary file into the inbox says it is complete: it is ingested at once, while a
    file written in place still waits out the (here long) stability wait."""
    settings.stable_seconds = 30.0
    films = fixture_images()[:2]
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue):
        shutil.copy(films[0], settings.inbox / "in-place.jpeg")
        shutil.copy(films[1], settings.inbox / "renamed.jpeg.part")
        os.rename(settings.inbox / "renamed.jpeg.part", settings.inbox / "renamed.jpeg")
        wait_for(lambda: enqueue.calls, 10, message="renamed.jpeg")
        assert [s.source_name for s in studies(settings)] == ["renamed.jpeg"]
        assert (settings.inbox / "in-place.jpeg").exists()  # still within its stability wait


def test_a_rename_seen_after_the_sweep_took_the_file_still_skips_the_stability_wait(settings):
    """The inbox sweep can list a film between its rename and the watcher's event; the event, arriving while the
    sweep's ingest is already waiting out the stability wait, must still end that wait."""
    settings.stable_seconds = 30.0
    film = settings.inbox / "late-event.jpeg"
    shutil.copy(fixture_images()[0], settings.inbox / "late-event.part")
    os.rename(settings.inbox / "late-event.part", film)  # before start: the start-up sweep takes it, with no event
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue) as ingester:
        wait_for(lambda: ingester._busy() == 1, 10, message="the sweep's ingest")
        time.sleep(0.3)  # it is now in its (30 s) stability wait
        assert enqueue.calls == []
        ingester.submit(film, renamed_in=True)  # the watcher's late event
        wait_for(lambda: enqueue.calls, 10, message="late-event.jpeg")
    assert [s.source_name for s in studies(settings)] == ["late-event.jpeg"]


def test_byte_identical_duplicate_is_recorded_not_enqueued(settings):
    src = fixture_images()[0]
    enqueue = Recorder(settings)
    ingester = Ingester(settings, enqueue).start()
    try:
        shutil.copy(src, settings.inbox / "first.jpeg")
        wait_for(lambda: enqueue.calls, 20, message="first.jpeg")
        shutil.copy(src, settings.inbox / "again.jpeg")
        wait_for(lambda: len(studies(settings)) == 2, 20, message="again.jpeg")
    finally:
        ingester.stop()  # waits for ingests in flight, so nothing more can be enqueued after this
    first, dup = studies(settings)
    assert (dup.source_name, dup.status, dup.duplicate_of_id) == ("again.jpeg", Status.DUPLICATE, first.id)
    assert dup.error == f"byte-identical duplicate of study {first.id} (first.jpeg)"
    assert enqueue.calls == [first.id]
    assert (dup.enqueue_count, dup.enqueued_at) == (0, None)
    # One archived copy serves both rows.
    assert dup.stored_path == first.stored_path
    assert [p.name for p in settings.archive_dir.rglob("*") if p.is_file()] == [Path(first.stored_path).name]
    assert list(settings.inbox.iterdir()) == []


def test_files_dropped_while_down_are_picked_up_on_start(settings):
    films = fixture_images()[:3]
    for i, film in enumerate(films):
        shutil.copy(film, settings.inbox / f"night-{i}.jpeg")
        os.utime(settings.inbox / f"night-{i}.jpeg", (1_700_000_000 + i, 1_700_000_000 + i))
    enqueue = Recorder(settings)
    with Ingester(settings, enqueue):
        wait_for(lambda: len(enqueue.calls) == 3, 20, message="three films from before start")
        wait_for(lambda: all(s.enqueue_count == 1 for s in studies(settings)), 20, message="mark_enqueued")
    rows = studies(settings)
    assert sorted(s.source_name for s in rows) == ["night-0.jpeg", "night-1.jpeg", "night-2.jpeg"]
    assert sorted(s.sha256 for s in rows) == sorted(sha(f.read_bytes()) for f in films)
    assert sorted(enqueue.calls) == [s.id for s in rows]
    assert list(settings.inbox.iterdir()) == []


def test_scan_inbox_ingests_oldest_first(settings):
    films = fixture_images()[:3]
    for i, film in enumerate(films):
        path = settings.inbox / f"{'cba'[i]}.jpeg"
        shutil.copy(film, path)
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    enqueue = Recorder(settings)
    ids = scan_inbox(settings=settings, enqueue=enqueue)
    assert [s.source_name for s in studies(settings)] == ["c.jpeg", "b.jpeg", "a.jpeg"]
    assert ids == enqueue.calls == [s.id for s in studies(settings)]


def test_stale_studies_are_re_enqueued(settings):
    films = fixture_images()
    down = Recorder(settings, fail_first=3)
    ids = [ingest_file(_drop(settings, f, f"f{i}.jpeg"), settings=settings, enqueue=down)
           for i, f in enumerate(films[:3])]
    assert down.calls == []  # broker down: rows exist, nothing sent
    assert [(s.status, s.enqueue_count, s.enqueued_at) for s in studies(settings)] == [(Status.QUEUED, 0, None)] * 3

    up = Recorder(settings)
    assert requeue_stale(settings=settings, enqueue=up) == ids  # never enqueued → stale at once
    assert requeue_stale(settings=settings, enqueue=up) == []  # just sent: not stale yet
    old = utcnow() - dt.timedelta(seconds=settings.requeue_after_seconds + 5)
    with session_scope(settings.database_url) as session:
        session.execute(update(Study).values(enqueued_at=old))
        session.execute(update(Study).where(Study.id == ids[1]).values(status=Status.PROCESSING))
        session.execute(update(Study).where(Study.id == ids[2]).values(status=Status.SCORED))
    assert requeue_stale(settings=settings, enqueue=up) == ids[:2]  # queued and stuck-processing; not scored
    assert up.calls == ids + ids[:2]
    assert [s.enqueue_count for s in studies(settings)] == [2, 2, 1]


def test_ingester_sweep_re_enqueues_after_a_broker_outage(settings):
    settings.requeue_after_seconds = 1
    enqueue = Recorder(settings, fail_first=1)
    with Ingester(settings, enqueue, sweep_seconds=0.2):
        shutil.copy(fixture_images()[0], settings.inbox / "film.jpeg")
        wait_for(lambda: enqueue.calls, 20, message="re-enqueue by the sweep")
    [study] = studies(settings)
    assert enqueue.calls[0] == study.id
    assert study.enqueue_count >= 1


def _drop(settings: Settings, src: Path, name: str) -> Path:
    dest = settings.inbox / name
    shutil.copy(src, dest)
    os.utime(dest, (1_700_000_000, 1_700_000_000))
    return dest


def test_file_with_an_undecodable_name_is_still_recorded(settings):
    data = fixture_images()[0].read_bytes()
    with open(os.path.join(os.fsencode(settings.inbox), b"scan-\xff\xfe.jpeg"), "wb") as f:
        f.write(data)
    enqueue = Recorder(settings)
    [sid] = scan_inbox(settings=settings, enqueue=enqueue)
    [study] = studies(settings)
    assert (study.id, study.source_name, study.sha256) == (sid, "scan-\\udcff\\udcfe.jpeg", sha(data))
    assert list(settings.inbox.iterdir()) == []
