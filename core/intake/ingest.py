"""Folder ingestion: a file dropped into the inbox becomes an archived, committed, then enqueued study.

Plain functions that tests call directly; core.intake.watcher wires them to watchdog.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from core import repository as repo
from core.db import session_scope
from core.films.dicom import DicomInfo, header_identity
from core.intake import claim
from core.intake import staleness
from core.models import Status, utcnow
from core.settings import Settings

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".swp")
EMPTY_REASON = "empty file (0 bytes)"  # the same words core.films.imaging uses
# create_study finds duplicates by read-then-insert; two copies ingested at once would both look first.
# One ingester per inbox, so a process-wide lock around that commit is enough.
_CREATE_LOCK = threading.Lock()


def is_candidate(path: Path) -> bool:
    """Tells whether an inbox entry is to be ingested: any finished-looking entry but a folder (not a dotfile
    or temp name). Links, pipes and devices are candidates too: they are recorded as failed, never read."""
    name = path.name
    if name.startswith(".") or name.endswith("~") or name.lower().endswith(TEMP_SUFFIXES):
        return False
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def clean_suffix(name: str) -> str:
    """Returns a safe lower-case extension for the archive name ('' when odd), keeping '.png' or '.jpeg'."""
    suffix = Path(name).suffix
    return suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ""


def display_name(path: Path) -> str:
    """Returns the file name as storable text (undecodable bytes escaped, at most 512 characters)."""
    return path.name.encode("utf-8", "backslashreplace").decode("utf-8")[:512]


@dataclass(frozen=True)
class _Archived:
    sha: str
    size: int
    dest: Path
    info: DicomInfo | None
    rejected: str | None
    signature: tuple[int, int, int]  # of the claimed file when it was copied


def _log_name(path: Path, info: DicomInfo | None, rejected: str | None) -> str:
    # A DICOM file's name may be built from patient identifiers by the sender; its SOP UID is not one.
    if info is not None:
        return f"SOP {info.sop_instance_uid}"
    return "an unreadable DICOM file" if rejected else path.name


def send(study_id: int, *, settings: Settings, enqueue: Enqueue) -> bool:
    """Enqueues a committed study and records it; a broker failure is logged and left to the re-enqueue sweep."""
    try:
        enqueue(study_id)
    except Exception as exc:
        log.warning("could not enqueue study %s (%s); it stays queued and is re-sent within %ss",
                    study_id, exc, settings.requeue_after_seconds)
        return False
    try:
        with session_scope(settings.database_url) as session:
            repo.mark_enqueued(session, study_ids=[study_id])
    except Exception as exc:  # the message is out; at worst the sweep sends it again (tasks are idempotent)
        log.warning("study %s enqueued but not marked (%s)", study_id, exc)
    return True


def ingest_file(path: str | Path, *, settings: Settings, enqueue: Enqueue, stop: threading.Event | None = None,
                wait: bool = True, hand_over: Callable[[int], None] | None = None,
                renamed_in: bool | Callable[[], bool] = False) -> int | None:
    """Claims one inbox entry, archives a verified copy, commits its Study and then enqueues it; returns the
    study id (None if skipped: vanished, already being ingested, or we are stopping).

    `path` is an inbox entry, or a file left in the claim folder (core.intake.claim), which is ingested again.
    Crash safety: the entry is first renamed into a private claim folder (core.intake.claim), then copied and hashed
    through one open descriptor, the archive copy verified, the row committed, and only then the claimed file
    removed; a crash at any point leaves the file in the inbox or the claim folder, to be ingested again.
    With `hand_over` (the watcher's core.intake.sender) the committed study is handed to it instead of being
    sent here, so that films committed together share one message. `renamed_in` (the watcher saw the entry
    renamed into the inbox; a callable when that can be learnt later) skips the stability wait for a file no
    process holds open for writing (core.intake.claim.wait_until_stable).
    Entries that are not regular files (links, pipes, devices) and files over `max_file_bytes` are recorded as
    failed studies and never read (see _record_unread).
    """
    path = Path(path)
    if claim.is_claimed(path, inbox=settings.inbox):
        if not claim.activate(path.parent):
            return None  # another thread of this process is on it
        claimed = path
    else:
        if not is_candidate(path):
            return None
        if wait and not claim.wait_until_stable(path, settings.stable_seconds, stop=stop, renamed_in=renamed_in):
            return None
        claimed = claim.claim(path, inbox=settings.inbox)
        if claimed is None:
            return None  # deleted by the sender, or taken by another ingest
    try:
        return _ingest_claimed(claimed, settings=settings, stop=stop,
                               send_study=hand_over or (lambda sid: send(sid, settings=settings, enqueue=enqueue)))
    finally:
        claim.finish(claimed.parent)


def _ingest_claimed(claimed: Path, *, settings: Settings, stop: threading.Event | None,
                    send_study: Callable[[int], object]) -> int | None:
    """Ingests a claimed entry; the claimed file is removed only once what it holds is recorded."""
    try:
        fd = claim.open_claimed(claimed)
    except claim.NotRegular as exc:
        study_id = _record_unread(settings, claimed, size=0, stored_path="",
                                  reason=f"not a regular file ({exc.kind}); not read")
        claim.remove_claimed(claimed)  # the link itself; its target is never touched
        return study_id
    try:
        study_id = None
        while True:
            try:
                archived = _archive(fd, claimed, settings=settings, stop=stop)
            except claim.Oversize as exc:
                return _reject_oversize(settings, claimed, exc)
            if archived is None:
                return study_id  # stopping: the claimed file stays, for the next start
            study_id, status = _record_retrying(settings, claimed, archived)
            log.info("ingested %s as study %s (%s, %s bytes, sha256 %s)",
                     _log_name(claimed, archived.info, archived.rejected), study_id, status, archived.size,
                     archived.sha[:12])
            if status == Status.QUEUED:
                send_study(study_id)
            # A sender that paused past the stability wait may still hold the file: let it finish first.
            claim.wait_writers_closed(fd, settings.writer_grace_seconds, stop=stop)
            if claim.signature(fd) == archived.signature:
                break
            # A sender still holding the file open wrote more after the recorded copy was taken: keep the
            # recorded study, and ingest the whole file again as a new one, so no byte is lost.
            log.warning("%s changed after study %s was recorded; ingesting it again",
                        _log_name(claimed, archived.info, archived.rejected), study_id)
            if not claim.wait_stable(fd, settings.stable_seconds, stop=stop):
                return study_id
        claim.remove_claimed(claimed, fd)
        return study_id
    finally:
        os.close(fd)


def _archive(fd: int, claimed: Path, *, settings: Settings, stop: threading.Event | None) -> _Archived | None:
    """Copies the open claimed file into the archive (or quarantine) under its sha256 once a full, unchanged
    read is made; None if we are stopping while waiting for a sender that is still writing."""
    suffix = clean_suffix(claimed.name)
    settings.archive_dir.mkdir(parents=True, exist_ok=True)
    while True:
        before = claim.signature(fd)
        if before[0] > settings.max_file_bytes:
            raise claim.Oversize(before[0], settings.max_file_bytes)
        staging = settings.archive_dir / f".incoming-{uuid.uuid4().hex}{suffix}"
        try:
            sha, size = claim.copy_and_hash(fd, staging, limit=settings.max_file_bytes)
            if claim.signature(fd) == before and size == before[0]:
                if claim.file_sha256(staging) != sha:
                    raise OSError(f"archive copy of {claimed.name} does not match what was read; retried")
                # The DICOM header is read from the archived copy: identity, deduplication and the guard.
                info, rejected = header_identity(staging, max_bytes=settings.max_file_bytes) if size else (None, None)
                if claim.signature(fd) == before:  # re-checked just before the copy becomes the record
                    folder = settings.quarantine_dir if size == 0 or rejected else settings.archive_dir / sha[:2]
                    folder.mkdir(parents=True, exist_ok=True)
                    dest = folder / f"{sha}{suffix}"
                    if not dest.exists():  # else a byte-identical copy is already kept: keep one
                        os.replace(staging, dest)
                    return _Archived(sha, size, dest, info, rejected, before)
        finally:
            staging.unlink(missing_ok=True)
        # The sender still writes into the claimed file (renaming does not stop an open writer).
        log.info("a claimed file is still being written (%s bytes now); waiting for it to settle",
                 claim.signature(fd)[0])
        if not claim.wait_stable(fd, settings.stable_seconds, stop=stop):
            return None


def _record_retrying(settings: Settings, claimed: Path, archived: _Archived) -> tuple[int, str]:
    """Commits the Study row (see _record), once more if another ingester took the SOP Instance UID meanwhile."""
    for attempt in range(2):
        try:
            return _record(settings, claimed, archived)
        except IntegrityError:
            # Another ingester committed the same SOP Instance UID between our look-up and insert; the
            # second try finds it and records this copy as its duplicate.
            if attempt or archived.info is None:
                raise
            log.info("SOP %s was recorded by another ingester meanwhile; retrying", archived.info.sop_instance_uid)
    raise AssertionError("unreachable")


def _record(settings: Settings, path: Path, archived: _Archived) -> tuple[int, str]:
    """Commits the Study row for an archived file; returns (study id, status)."""
    info, rejected = archived.info, archived.rejected
    with _CREATE_LOCK, session_scope(settings.database_url) as session:
        study = repo.create_study(session, source_name=display_name(path), sha256=archived.sha,
                                  size_bytes=archived.size,
                                  stored_path=archived.dest.relative_to(settings.data_dir).as_posix(),
                                  identity=info.to_dict() if info is not None else None,
                                  # Nothing to score and nothing to deduplicate against: every empty file
                                  # is its own failure.
                                  failure=EMPTY_REASON if archived.size == 0 else None)
        if rejected and study.status == Status.QUEUED:
            study.status, study.error = Status.FAILED, rejected  # already in quarantine
        elif study.status == Status.QUEUED and info is not None and (reason := info.refusal()):
            # The guard: listed with its reason and kept in the archive, but never sent to the model.
            study.status, study.error = Status.REFUSED, reason
        return study.id, study.status


def _record_unread(settings: Settings, path: Path, *, size: int, stored_path: str, reason: str) -> int:
    """Commits a failed Study for an entry that was deliberately not read (no hash: sha256 is empty)."""
    with _CREATE_LOCK, session_scope(settings.database_url) as session:
        study = repo.create_study(session, source_name=display_name(path), sha256="", size_bytes=size,
                                  stored_path=stored_path, failure=reason)
        study_id = study.id
    # Not the name (a sender may build DICOM file names from patient identifiers) nor where it is kept.
    log.warning("recorded an inbox entry as failed study %s: %s", study_id, reason.split(";")[0])
    return study_id


def _reject_oversize(settings: Settings, claimed: Path, exc: claim.Oversize) -> int:
    """Records an oversize file as failed and keeps it, unread, in `<inbox>/.rejected/` (not in the archive:
    it is never read, and the inbox's own file system takes it with one rename, whatever its size). The row
    is committed first, naming where the file will be, so a crash in between re-ingests the claimed file."""
    kept = settings.inbox / claim.REJECT_DIR / claimed.parent.name / claimed.name
    reason = (f"file is {exc.size:,} bytes, over the limit of {exc.limit:,} (max_file_bytes); not read, "
              f"kept at {kept}")
    study_id = _record_unread(settings, claimed, size=exc.size, stored_path=kept.as_posix(), reason=reason)
    claim.reject(claimed, inbox=settings.inbox)
    return study_id


def inbox_files(settings: Settings) -> list[Path]:
    """Lists files left in the claim folder (by a crash or a failed try), then candidate inbox entries, each
    oldest first."""
    def key(p: Path):
        try:
            return (os.lstat(p).st_mtime, p.name)
        except OSError:
            return (float("inf"), p.name)
    try:
        entries = list(settings.inbox.iterdir())
    except FileNotFoundError:
        entries = []
    return (sorted(claim.leftovers(settings.inbox), key=key)
            + sorted((p for p in entries if is_candidate(p)), key=key))


def scan_inbox(*, settings: Settings, enqueue: Enqueue, stop: threading.Event | None = None) -> list[int]:
    """Ingests every file already in the inbox (those dropped while the ingester was down); returns study ids."""
    ids = []
    for path in inbox_files(settings):
        try:
            sid = ingest_file(path, settings=settings, enqueue=enqueue, stop=stop)
        except Exception:
            log.exception("could not ingest %s; it stays in the inbox or claim folder and is retried", path)
            continue
        if sid is not None:
            ids.append(sid)
    return ids


def requeue_stale(*, settings: Settings, enqueue: Enqueue, skip: Callable[[], set[int]] = set) -> list[int]:
    """Sends again the unfinished studies whose message looks lost or whose worker died holding the claim
    (the rule is core.intake.staleness.stale_study_ids); healthy work waiting in the broker or held by a live worker
    is left alone, and so are the `skip()` ids (handed to the watcher's sender and about to go)."""
    with session_scope(settings.database_url) as session:
        ids = staleness.stale_study_ids(session, now=utcnow(), requeue_after_seconds=settings.requeue_after_seconds,
                                        worker_alive_seconds=settings.worker_alive_seconds,
                                        claim_timeout_seconds=settings.claim_timeout_seconds)
    sent, skipping = [], skip()
    for sid in (i for i in ids if i not in skipping):
        if not send(sid, settings=settings, enqueue=enqueue):
            break  # broker down: the next sweep tries again
        sent.append(sid)
    if sent:
        log.warning("re-enqueued %d study(ies) with no result after %ss: %s", len(sent),
                    settings.requeue_after_seconds, sent)
    return sent
