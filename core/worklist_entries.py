"""Worklist rows as readers see them: the row (lead image, images, wait, tier) and the status strip.

Pure helpers over loaded studies; core.worklist decides which rows and in which order.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

from core import worklist_rows
from core.models import Status, Study, utcnow
from core.worklist_sections import DUPLICATES, FAILED, IN_PROGRESS, READ, REFUSED, UNREAD

TIER_FLAGGED, TIER_OVERDUE, TIER_ROUTINE = 0, 1, 2


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
    def received_at(self) -> dt.datetime:
        """When the row's first image arrived."""
        return min(s.received_at for s in self.images)

    @property
    def flagged_when_scored(self) -> bool:
        """Whether any of the row's images was flagged when it was scored (the read list's "FLAGGED")."""
        return any(s.scored_flagged for s in self.images)

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
    next_cursor: str | None = None  # where the next page starts; None on the last page
    offset: int = 0  # rows listed before this page


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
    duplicates: int = 0
    model_versions: list[str] = field(default_factory=list)  # loaded by live workers
    calibration_version: str | None = None
    calibration_model_version: str | None = None
    threshold: float | None = None

    @property
    def queue_length(self) -> int:
        return self.queued + self.processing


def as_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def overdue_cutoff(now: dt.datetime, max_wait_minutes: int) -> dt.datetime:
    return as_utc(now) - dt.timedelta(minutes=max_wait_minutes)


def waiting_seconds(study: Study, *, now: dt.datetime) -> float:
    """Returns how long a study has waited: until its finding if read, else until now."""
    end = study.feedback_at if study.finding is not None and study.feedback_at is not None else as_utc(now)
    return max(0.0, (end - study.received_at).total_seconds())


def is_unread(study: Study) -> bool:
    """Tells whether a study belongs on the reading worklist."""
    return study.status == Status.SCORED and study.finding is None


def section_of(study: Study) -> str:
    """Names the section a study is listed in; the sections partition all studies."""
    if study.status == Status.SCORED:
        return UNREAD if study.finding is None else READ
    return {Status.FAILED: FAILED, Status.DUPLICATE: DUPLICATES, Status.REFUSED: REFUSED}.get(study.status, IN_PROGRESS)


def key_of(study: Study) -> str:
    """Returns the worklist row key of a study: its patient and Study Instance UID, or '#<id>'."""
    return worklist_rows.key_of(study)


def entry_for(study: Study, *, max_wait_minutes: int, now: dt.datetime | None = None) -> Entry:
    """Wraps one study as a row; overdue and the tier apply only to unread studies."""
    now = now or utcnow()
    waited = waiting_seconds(study, now=now)
    if not is_unread(study):
        return Entry(study, waited, False, None)
    overdue = study.received_at < overdue_cutoff(now, max_wait_minutes)
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
    overdue = received < overdue_cutoff(now, max_wait_minutes)
    tier = (TIER_FLAGGED if any(s.flagged for s in ordered) else TIER_OVERDUE if overdue else TIER_ROUTINE)
    return Entry(lead, max(0.0, (as_utc(now) - received).total_seconds()), overdue, tier, ordered)
