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
The other sections: in progress (queued/processing, oldest first), refused (films the guard keeps from
the model, newest first, with the reason), failed (newest first, with the reason), duplicates (newest
first) and read (scored with a finding, latest feedback first); every study is in exactly one section.

**DICOM studies.** The images of one DICOM study (same Study Instance UID) are one row in the unread
and read sections: its risk is the highest score among its scored images (refused laterals are never
scored, so they never count), it is flagged if any image is, and it waits since its earliest unread
image arrived. ``Entry.study`` is the row's lead image (the highest score), ``Entry.images`` all its
images in that section. Films without a Study Instance UID (PNG/JPEG) are rows of their own. Grouping
is a query concern only: each image stays one Study row with its own status, score and finding.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

from collections import defaultdict

from sqlalchemy import String, case, cast, func, literal_column, or_, select
from sqlalchemy.orm import Session

from core import calibrations
from core import repository as repo
from core.models import Status, Study, utcnow

TIER_FLAGGED, TIER_OVERDUE, TIER_ROUTINE = 0, 1, 2
SECTIONS = ("unread", "in_progress", "refused", "failed", "duplicates", "read")
GROUPED_SECTIONS = ("unread", "read")


@dataclass(frozen=True)
class Entry:
    """A worklist row: its lead study, all its images, how long it has waited and whether that is too long."""

    study: Study
    waiting_seconds: float
    overdue: bool
    tier: int | None = None  # only for unread studies
    images: tuple[Study, ...] = ()  # the row's images, lead first; (study,) for a film of its own

    def __post_init__(self):
        if not self.images:
            object.__setattr__(self, "images", (self.study,))

    @property
    def score(self) -> float | None:
        """Returns the row's risk: the highest displayed score among its scored images."""
        scores = [s.score for s in self.images if s.status == Status.SCORED and s.score is not None]
        return max(scores) if scores else self.study.score

    @property
    def flagged(self) -> bool:
        """Tells whether any scored image of the row is flagged."""
        return any(s.flagged for s in self.images if s.status == Status.SCORED)


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
    refused: int = 0
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
    return {Status.FAILED: "failed", Status.DUPLICATE: "duplicates",
            Status.REFUSED: "refused"}.get(study.status, "in_progress")


def group_key():
    """SQL for the worklist row a study belongs to: its Study Instance UID, or '#<id>' for a film of its own."""
    # The '#' is inlined, not a bound parameter, so Postgres sees SELECT and GROUP BY as the same expression.
    return func.coalesce(Study.study_instance_uid, literal_column("'#'", String) + cast(Study.id, String))


def key_of(study: Study) -> str:
    """Returns group_key() for a loaded study."""
    return study.study_instance_uid or f"#{study.id}"


def entry_for(study: Study, *, max_wait_minutes: int, now: dt.datetime | None = None) -> Entry:
    """Wraps one study as a row; overdue and the tier apply only to unread studies."""
    now = now or utcnow()
    waited = waiting_seconds(study, now=now)
    if not is_unread(study):
        return Entry(study, waited, False, None)
    overdue = study.received_at < _cutoff(now, max_wait_minutes)
    tier = TIER_FLAGGED if study.flagged else TIER_OVERDUE if overdue else TIER_ROUTINE
    return Entry(study, waited, overdue, tier)


def group_entry(images: list[Study], *, max_wait_minutes: int, now: dt.datetime | None = None) -> Entry:
    """Wraps the images of one row (all unread, or all read) as a row led by its highest score."""
    now = now or utcnow()
    ordered = tuple(sorted(images, key=lambda s: (s.score is None, -(s.score or 0.0), s.id)))
    lead = ordered[0]
    if len(ordered) == 1 or lead.status != Status.SCORED:
        return replace(entry_for(lead, max_wait_minutes=max_wait_minutes, now=now), images=ordered)
    received = min(s.received_at for s in ordered)
    if lead.finding is not None:
        read_at = max(s.feedback_at or received for s in ordered)
        return Entry(lead, max(0.0, (read_at - received).total_seconds()), False, None, ordered)
    overdue = received < _cutoff(now, max_wait_minutes)
    tier = (TIER_FLAGGED if any(s.flagged for s in ordered) else TIER_OVERDUE if overdue else TIER_ROUTINE)
    return Entry(lead, max(0.0, (_aware(now) - received).total_seconds()), overdue, tier, ordered)


def _unread_filter():
    return (Study.status == Status.SCORED, Study.finding.is_(None))


def _read_filter():
    return (Study.status == Status.SCORED, Study.finding.is_not(None))


def _groups(*conditions):
    """One row per worklist row among the studies matching conditions, with what ordering needs."""
    return (select(group_key().label("key"), func.max(Study.score).label("score"),
                   func.max(case((Study.flagged.is_(True), 1), else_=0)).label("flagged"),
                   func.min(Study.received_at).label("received_at"),
                   func.max(Study.feedback_at).label("feedback_at"), func.min(Study.id).label("first_id"))
            .where(*conditions).group_by(group_key()).subquery())


def _grouped_entries(session: Session, conditions, keys: list[str] | None, *, max_wait_minutes: int,
                     now: dt.datetime) -> list[Entry]:
    """Loads the rows named by keys (every row when None), in the order of keys."""
    query = select(Study).where(*conditions)
    if keys is not None:
        uids = [k for k in keys if not k.startswith("#")]
        ids = [int(k[1:]) for k in keys if k.startswith("#")]
        query = query.where(or_(Study.study_instance_uid.in_(uids), Study.id.in_(ids)))
    members: dict[str, list[Study]] = defaultdict(list)
    for study in session.scalars(query):
        members[key_of(study)].append(study)
    order = keys if keys is not None else list(members)
    return [group_entry(members[k], max_wait_minutes=max_wait_minutes, now=now) for k in order if members[k]]


def unread(session: Session, *, max_wait_minutes: int, now: dt.datetime | None = None,
           limit: int | None = None) -> list[Entry]:
    """Returns unread rows (a DICOM study or a film of its own) in reading order (see the module docstring)."""
    now = now or utcnow()
    cutoff = _cutoff(now, max_wait_minutes)
    g = _groups(*_unread_filter())
    tier = case((g.c.flagged == 1, TIER_FLAGGED), (g.c.received_at < cutoff, TIER_OVERDUE), else_=TIER_ROUTINE)
    # Only the overdue tier sorts by arrival before score; in the others this key is NULL for every row.
    overdue_arrival = case((tier == TIER_OVERDUE, g.c.received_at), else_=None)
    keys = list(session.scalars(select(g.c.key).order_by(tier, overdue_arrival, g.c.score.desc(), g.c.received_at,
                                                          g.c.first_id).limit(limit)))
    return _grouped_entries(session, _unread_filter(), keys, max_wait_minutes=max_wait_minutes, now=now)


def _read(session: Session, *, max_wait_minutes: int, now: dt.datetime, limit: int | None) -> list[Entry]:
    g = _groups(*_read_filter())
    keys = list(session.scalars(select(g.c.key).order_by(g.c.feedback_at.desc(), g.c.first_id.desc()).limit(limit)))
    return _grouped_entries(session, _read_filter(), keys, max_wait_minutes=max_wait_minutes, now=now)


def row_for(session: Session, *, study_id: int, max_wait_minutes: int, now: dt.datetime | None = None) -> Entry | None:
    """Returns the worklist row a study is listed in: for an unread or read DICOM image, its study's row."""
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        return None
    name = section_of(study)
    if name not in GROUPED_SECTIONS or not study.study_instance_uid:
        return entry_for(study, max_wait_minutes=max_wait_minutes, now=now)
    images = [s for s in repo.group_images(session, study_id=study_id) if section_of(s) == name]
    return group_entry(images, max_wait_minutes=max_wait_minutes, now=now)


def _entries(session: Session, query, *, now: dt.datetime) -> list[Entry]:
    return [Entry(s, waiting_seconds(s, now=now), False) for s in session.scalars(query)]


def _count(session: Session, *conditions) -> int:
    return session.scalar(select(func.count()).select_from(Study).where(*conditions)) or 0


def _count_rows(session: Session, *conditions) -> int:
    """Counts worklist rows (a DICOM study counts once) among the studies matching conditions."""
    return session.scalar(select(func.count(func.distinct(group_key()))).where(*conditions)) or 0


def section(session: Session, name: str, *, max_wait_minutes: int, now: dt.datetime | None = None,
            limit: int | None = None) -> Section:
    """Returns one worklist section by name (one of SECTIONS)."""
    now = now or utcnow()
    if name == "unread":
        entries = unread(session, max_wait_minutes=max_wait_minutes, now=now, limit=limit)
        return Section(name, entries, _count_rows(session, *_unread_filter()))
    if name == "read":
        entries = _read(session, max_wait_minutes=max_wait_minutes, now=now, limit=limit)
        return Section(name, entries, _count_rows(session, *_read_filter()))
    if name == "in_progress":
        cond = (Study.status.in_([Status.QUEUED, Status.PROCESSING]),)
        order = (Study.received_at, Study.id)
    elif name == "refused":
        cond = (Study.status == Status.REFUSED,)
        order = (Study.received_at.desc(), Study.id.desc())
    elif name == "failed":
        cond = (Study.status == Status.FAILED,)
        order = (Study.received_at.desc(), Study.id.desc())
    elif name == "duplicates":
        cond = (Study.status == Status.DUPLICATE,)
        order = (Study.received_at.desc(), Study.id.desc())
    else:
        raise ValueError(f"unknown worklist section {name!r}; expected one of {SECTIONS}")
    entries = _entries(session, select(Study).where(*cond).order_by(*order).limit(limit), now=now)
    return Section(name, entries, _count(session, *cond))


def all_studies(session: Session, *, max_wait_minutes: int, now: dt.datetime | None = None) -> list[Entry]:
    """Returns every row once (every study once, within its row): the unread worklist in reading order, then
    the other sections."""
    now = now or utcnow()
    out: list[Entry] = []
    for name in SECTIONS:
        out.extend(section(session, name, max_wait_minutes=max_wait_minutes, now=now).entries)
    return out


def status_strip(session: Session, *, worker_alive_seconds: int, max_wait_minutes: int,
                 now: dt.datetime | None = None) -> StatusStrip:
    """Returns queue length, unread/overdue/read rows (a DICOM study counts once), failed/refused films, live
    workers and the active model and calibration."""
    now = now or utcnow()
    counts = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
    unread_count = _count_rows(session, *_unread_filter())
    # A row is overdue when its earliest unread image is, i.e. when any of them is.
    overdue = _count_rows(session, *_unread_filter(), Study.received_at < _cutoff(now, max_wait_minutes))
    read_count = _count_rows(session, *_read_filter())
    workers = repo.live_workers(session, within_seconds=worker_alive_seconds)
    cal = calibrations.active(session)
    return StatusStrip(
        now=_aware(now), queued=counts.get(Status.QUEUED, 0), processing=counts.get(Status.PROCESSING, 0),
        unread=unread_count, overdue=overdue, failed=counts.get(Status.FAILED, 0), read=read_count,
        workers_alive=len(workers), refused=counts.get(Status.REFUSED, 0),
        model_versions=sorted({w.model_version for w in workers if w.model_version}),
        calibration_version=cal.version if cal else None,
        calibration_model_version=cal.model_version if cal else None,
        threshold=cal.threshold if cal else None)
