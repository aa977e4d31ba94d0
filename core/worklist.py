"""The worklist: which studies a reader sees, in which order, and the status strip above them.

Unread order (studies with status ``scored`` and no recorded finding), decided in SQL so it is the
same on SQLite and Postgres and can later be paged:

1. **Flagged** studies (displayed score ≥ displayed threshold), by score descending, ties oldest
   first. A flagged study that is also overdue stays here (it is already on top) and gets the
   OVERDUE mark.
2. **Overdue** unflagged studies (unread longer than ``max_wait_minutes`` since they were received),
   longest waiting first, ties by score descending. Sorting by risk alone starves low-risk films,
   so the wait limit lifts them above every unflagged study, and among themselves they are served
   first come, first served so that none waits without bound.
3. **Other** unflagged studies, by score descending, ties oldest first.

Any remaining tie falls back to the study id, so the order is total and stable between refreshes.
The other sections: in progress (queued/processing, oldest first), failed (newest first, with the
reason), duplicates (newest first) and read (scored with a finding, latest feedback first); every
study is in exactly one section.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from core import repository as repo
from core.models import Status, Study, utcnow

TIER_FLAGGED, TIER_OVERDUE, TIER_ROUTINE = 0, 1, 2
SECTIONS = ("unread", "in_progress", "failed", "duplicates", "read")


@dataclass(frozen=True)
class Entry:
    """A study as a worklist row: how long it has waited and whether that is too long."""

    study: Study
    waiting_seconds: float
    overdue: bool
    tier: int | None = None  # only for unread studies


@dataclass
class Section:
    """One table of the worklist page; ``total`` counts rows beyond ``limit`` too."""

    name: str
    entries: list[Entry]
    total: int


@dataclass
class StatusStrip:
    """What the strip above the worklist shows."""

    now: dt.datetime
    queued: int
    processing: int
    unread: int
    overdue: int
    failed: int
    read: int
    workers_alive: int
    model_versions: list[str] = field(default_factory=list)  # loaded by live workers
    calibration_version: str | None = None
    calibration_model_version: str | None = None
    threshold: float | None = None

    @property
    def queue_length(self) -> int:
        return self.queued + self.processing


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _cutoff(now: dt.datetime, max_wait_minutes: int) -> dt.datetime:
    return _aware(now) - dt.timedelta(minutes=max_wait_minutes)


def waiting_seconds(study: Study, *, now: dt.datetime) -> float:
    """Returns how long a study has waited: until its finding if read, else until now."""
    end = study.feedback_at if study.finding is not None and study.feedback_at is not None else _aware(now)
    return max(0.0, (end - study.received_at).total_seconds())


def is_unread(study: Study) -> bool:
    """Tells whether a study belongs on the reading worklist."""
    return study.status == Status.SCORED and study.finding is None


def section_of(study: Study) -> str:
    """Names the section a study is listed in; the sections partition all studies."""
    if study.status == Status.SCORED:
        return "unread" if study.finding is None else "read"
    return {Status.FAILED: "failed", Status.DUPLICATE: "duplicates"}.get(study.status, "in_progress")


def entry_for(study: Study, *, max_wait_minutes: int, now: dt.datetime | None = None) -> Entry:
    """Wraps one study as a row; overdue and the tier apply only to unread studies."""
    now = now or utcnow()
    waited = waiting_seconds(study, now=now)
    if not is_unread(study):
        return Entry(study, waited, False, None)
    overdue = study.received_at < _cutoff(now, max_wait_minutes)
    tier = TIER_FLAGGED if study.flagged else TIER_OVERDUE if overdue else TIER_ROUTINE
    return Entry(study, waited, overdue, tier)


def _unread_filter():
    return (Study.status == Status.SCORED, Study.finding.is_(None))


def unread(session: Session, *, max_wait_minutes: int, now: dt.datetime | None = None,
           limit: int | None = None) -> list[Entry]:
    """Returns unread scored studies in reading order (see the module docstring)."""
    now = now or utcnow()
    cutoff = _cutoff(now, max_wait_minutes)
    tier = case((Study.flagged.is_(True), TIER_FLAGGED), (Study.received_at < cutoff, TIER_OVERDUE),
                else_=TIER_ROUTINE)
    # Only the overdue tier sorts by arrival before score; in the others this key is NULL for every row.
    overdue_arrival = case((tier == TIER_OVERDUE, Study.received_at), else_=None)
    query = (select(Study).where(*_unread_filter())
             .order_by(tier, overdue_arrival, Study.score.desc(), Study.received_at, Study.id).limit(limit))
    return [entry_for(s, max_wait_minutes=max_wait_minutes, now=now) for s in session.scalars(query)]


def _entries(session: Session, query, *, now: dt.datetime) -> list[Entry]:
    return [Entry(s, waiting_seconds(s, now=now), False) for s in session.scalars(query)]


def _count(session: Session, *conditions) -> int:
    return session.scalar(select(func.count()).select_from(Study).where(*conditions)) or 0


def section(session: Session, name: str, *, max_wait_minutes: int, now: dt.datetime | None = None,
            limit: int | None = None) -> Section:
    """Returns one worklist section by name (one of SECTIONS)."""
    now = now or utcnow()
    if name == "unread":
        entries = unread(session, max_wait_minutes=max_wait_minutes, now=now, limit=limit)
        return Section(name, entries, _count(session, *_unread_filter()))
    if name == "in_progress":
        cond = (Study.status.in_([Status.QUEUED, Status.PROCESSING]),)
        order = (Study.received_at, Study.id)
    elif name == "failed":
        cond = (Study.status == Status.FAILED,)
        order = (Study.received_at.desc(), Study.id.desc())
    elif name == "duplicates":
        cond = (Study.status == Status.DUPLICATE,)
        order = (Study.received_at.desc(), Study.id.desc())
    elif name == "read":
        cond = (Study.status == Status.SCORED, Study.finding.is_not(None))
        order = (Study.feedback_at.desc(), Study.id.desc())
    else:
        raise ValueError(f"unknown worklist section {name!r}; expected one of {SECTIONS}")
    entries = _entries(session, select(Study).where(*cond).order_by(*order).limit(limit), now=now)
    return Section(name, entries, _count(session, *cond))


def all_studies(session: Session, *, max_wait_minutes: int, now: dt.datetime | None = None) -> list[Entry]:
    """Returns every study once: the unread worklist in reading order, then the other sections."""
    now = now or utcnow()
    out: list[Entry] = []
    for name in SECTIONS:
        out.extend(section(session, name, max_wait_minutes=max_wait_minutes, now=now).entries)
    return out


def status_strip(session: Session, *, worker_alive_seconds: int, max_wait_minutes: int,
                 now: dt.datetime | None = None) -> StatusStrip:
    """Returns queue length, unread/overdue counts, live workers and the active model and calibration."""
    now = now or utcnow()
    counts = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
    unread_count = _count(session, *_unread_filter())
    overdue = _count(session, *_unread_filter(), Study.received_at < _cutoff(now, max_wait_minutes))
    read_count = _count(session, Study.status == Status.SCORED, Study.finding.is_not(None))
    workers = repo.live_workers(session, within_seconds=worker_alive_seconds)
    cal = repo.active_calibration(session)
    return StatusStrip(
        now=_aware(now), queued=counts.get(Status.QUEUED, 0), processing=counts.get(Status.PROCESSING, 0),
        unread=unread_count, overdue=overdue, failed=counts.get(Status.FAILED, 0), read=read_count,
        workers_alive=len(workers),
        model_versions=sorted({w.model_version for w in workers if w.model_version}),
        calibration_version=cal.version if cal else None,
        calibration_model_version=cal.model_version if cal else None,
        threshold=cal.threshold if cal else None)
