"""Folder ingestion: a file dropped into the inbox becomes an archived, committed, then enqueued study.

Plain functions that tests call directly; core.watcher wires them to watchdog.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from core import repository as repo
from core.db import session_scope
from core.dicom import DicomInfo, header_identity
from core.models import Status, utcnow
from core.settings import Settings

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".swp")
EMPTY_REASON = "empty file (0 bytes)"  # the same words core.imaging uses
# create_study finds duplicates by read-then-insert; two copies ingested at once would both look first.
# One ingester per inbox, so a process-wide lock around that commit is enough.
_CREATE_LOCK = threading.Lock()


def is_candidate(path: Path) -> bool:
    """Tells whether an inbox entry is a finished-looking regular file (not a dotfile, temp name or link)."""
    name = path.name
    if name.startswith(".") or name.endswith("~") or name.lower().endswith(TEMP_SUFFIXES):
        return False
    return path.is_file() and not path.is_symlink()


def clean_suffix(name: str) -> str:
    """Returns a safe lower-case extension for the archive name ('' when odd), keeping '.png' or '.jpeg'."""
    suffix = Path(name).suffix
    return suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ""


def display_name(path: Path) -> str:
    """Returns the file name as storable text (undecodable bytes escaped, at most 512 characters)."""
    return path.name.encode("utf-8", "backslashreplace").decode("utf-8")[:512]


def _can_open(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def wait_until_stable(path: Path, seconds: float, *, stop: threading.Event | None = None) -> bool:
    """Blocks until the file has not changed for `seconds` and opens; False if it vanished or we are stopping."""
    poll = max(0.02, min(0.25, seconds / 4))
    last, since = None, time.monotonic()
    while True:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        now = time.monotonic()
        if sig != last:
            last, since = sig, now
        else:
            # A file last touched long ago (dropped while we were down) needs no full wait; every write
            # moves mtime/ctime, so an old timestamp plus one unchanged poll means it is complete.
            idle_on_disk = time.time() - max(st.st_mtime, st.st_ctime) >= seconds
            if (now - since >= seconds or idle_on_disk) and _can_open(path):
                return True
        if stop is not None and stop.is_set():
            return False
        time.sleep(poll)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-links src to dst (same file system, instant) or copies it."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dst)


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


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
            repo.mark_enqueued(session, study_id=study_id)
    except Exception as exc:  # the message is out; at worst the sweep sends it again (tasks are idempotent)
        log.warning("study %s enqueued but not marked (%s)", study_id, exc)
    return True


def ingest_file(path: str | Path, *, settings: Settings, enqueue: Enqueue, stop: threading.Event | None = None,
                wait: bool = True) -> int | None:
    """Archives one inbox file, commits its Study and then enqueues it; returns the study id (None if skipped).

    Order matters for crash safety: the archive copy is made first, the row committed second and only then
    the inbox file removed, so a crash at any point leaves the file in the inbox to be picked up again.
    """
    path = Path(path)
    if not is_candidate(path) or (wait and not wait_until_stable(path, settings.stable_seconds, stop=stop)):
        return None
    suffix = clean_suffix(path.name)
    settings.archive_dir.mkdir(parents=True, exist_ok=True)
    staging = settings.archive_dir / f".incoming-{uuid.uuid4().hex}{suffix}"
    try:
        try:
            _link_or_copy(path, staging)
        except FileNotFoundError:
            return None  # taken by another ingester, or deleted by the sender
        # Hash the archived bytes themselves, so the name always matches the content kept.
        sha, size = _sha256(staging)
        # A DICOM header is read here, from the archived copy: identity, deduplication and the guard need it.
        info, rejected = header_identity(staging) if size else (None, None)
        folder = settings.quarantine_dir if size == 0 or rejected else settings.archive_dir / sha[:2]
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{sha}{suffix}"
        if not dest.exists():
            os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)  # a byte-identical copy already exists: keep one
    for attempt in range(2):
        try:
            study_id, status = _record(settings, path, sha=sha, size=size, dest=dest, info=info, rejected=rejected)
            break
        except IntegrityError:
            # Another ingester committed the same SOP Instance UID between our look-up and insert; the
            # second try finds it and records this copy as its duplicate.
            if attempt or info is None:
                raise
            log.info("SOP %s was recorded by another ingester meanwhile; retrying", info.sop_instance_uid)
    path.unlink(missing_ok=True)
    log.info("ingested %s as study %s (%s, %s bytes, sha256 %s)", _log_name(path, info, rejected), study_id,
             status, size, sha[:12])
    if status == Status.QUEUED:
        send(study_id, settings=settings, enqueue=enqueue)
    return study_id


def _record(settings: Settings, path: Path, *, sha: str, size: int, dest: Path, info: DicomInfo | None,
            rejected: str | None) -> tuple[int, str]:
    """Commits the Study row for an archived file; returns (study id, status)."""
    with _CREATE_LOCK, session_scope(settings.database_url) as session:
        study = repo.create_study(session, source_name=display_name(path), sha256=sha, size_bytes=size,
                                  stored_path=dest.relative_to(settings.data_dir).as_posix(),
                                  identity=info.to_dict() if info is not None else None)
        if size == 0:
            # Nothing to score and nothing to deduplicate against: every empty file is its own failure.
            study.status, study.error, study.duplicate_of_id = Status.FAILED, EMPTY_REASON, None
        elif rejected and study.status == Status.QUEUED:
            study.status, study.error = Status.FAILED, rejected  # already in quarantine
        elif study.status == Status.QUEUED and info is not None and (reason := info.refusal()):
            # The guard: listed with its reason and kept in the archive, but never sent to the model.
            study.status, study.error = Status.REFUSED, reason
        return study.id, study.status


def inbox_files(settings: Settings) -> list[Path]:
    """Lists candidate files in the inbox, oldest first."""
    def key(p: Path):
        try:
            return (p.stat().st_mtime, p.name)
        except OSError:
            return (float("inf"), p.name)
    try:
        entries = list(settings.inbox.iterdir())
    except FileNotFoundError:
        return []
    return sorted((p for p in entries if is_candidate(p)), key=key)


def scan_inbox(*, settings: Settings, enqueue: Enqueue, stop: threading.Event | None = None) -> list[int]:
    """Ingests every file already in the inbox (those dropped while the ingester was down); returns study ids."""
    ids = []
    for path in inbox_files(settings):
        try:
            sid = ingest_file(path, settings=settings, enqueue=enqueue, stop=stop)
        except Exception:
            log.exception("could not ingest %s; it stays in the inbox and is retried", path)
            continue
        if sid is not None:
            ids.append(sid)
    return ids


def requeue_stale(*, settings: Settings, enqueue: Enqueue) -> list[int]:
    """Re-enqueues studies left queued/processing past requeue_after_seconds (a lost broker message)."""
    cutoff = utcnow() - dt.timedelta(seconds=settings.requeue_after_seconds)
    with session_scope(settings.database_url) as session:
        ids = repo.stale_study_ids(session, older_than=cutoff)
    sent = []
    for sid in ids:
        if not send(sid, settings=settings, enqueue=enqueue):
            break  # broker down: the next sweep tries again
        sent.append(sid)
    if sent:
        log.warning("re-enqueued %d study(ies) with no result after %ss: %s", len(sent),
                    settings.requeue_after_seconds, sent)
    return sent
