"""Filtered and sorted worklist rows: flagged, overdue, received between two dates, modality, with or
without a finding, sorted by risk, oldest or newest first. Server-side and keyset-paged like the triage lists
(core.worklist), each sort read along an index of `worklist_rows` (migration 0007 adds the risk and arrival
orders), so a page costs about the same at 100 or 100,000 studies. The default triage order is never changed:
this is a separate listing the page offers next to it.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from core import worklist as wl
from core.cursor import Cursor, decode
from core.models import Study, WorklistRow, utcnow
from core.worklist_entries import Section, overdue_cutoff
from core.worklist_sections import READ, UNREAD

SORTS = ("risk", "oldest", "newest")
MODALITIES = ("CR", "DX")
# Sort: (columns of the keyset, descending?)
_ORDER = {
    "risk": ((WorklistRow.neg_score, WorklistRow.first_id), False),
    "oldest": ((WorklistRow.received_at, WorklistRow.first_id), False),
    "newest": ((WorklistRow.received_at, WorklistRow.first_id), True),
}


@dataclass(frozen=True)
class Filters:
    """What a filtered listing shows; the defaults show every unread row by risk."""

    read: bool = False  # rows with a recorded finding (else: still to read)
    flagged: bool = False
    overdue: bool = False  # unread longer than the wait limit
    received_from: dt.date | None = None  # first day included, in the server's (hospital's) time zone
    received_to: dt.date | None = None  # last day included
    modality: str | None = None
    sort: str = "risk"

    def __post_init__(self):
        if self.sort not in SORTS:
            raise ValueError(f"unknown sort {self.sort!r}; expected one of {SORTS}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.received_from and self.received_to and self.received_from > self.received_to:
            raise ValueError("the first day of the date range is after its last day")


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min).astimezone().astimezone(dt.timezone.utc)


def _conditions(filters: Filters, *, cutoff: dt.datetime) -> list:
    where = [WorklistRow.section == (READ if filters.read else UNREAD)]
    if filters.flagged:
        where.append(WorklistRow.flagged == true())
    if filters.overdue:
        where.append(WorklistRow.received_at < cutoff)
    if filters.received_from:
        where.append(WorklistRow.received_at >= _day_start(filters.received_from))
    if filters.received_to:
        where.append(WorklistRow.received_at < _day_start(filters.received_to + dt.timedelta(days=1)))
    if filters.modality:
        # The row's lead image carries the modality (the images of one DICOM study share it).
        where.append(WorklistRow.lead_id.in_(select(Study.id).where(Study.modality == filters.modality)))
    return where


def filtered(session: Session, *, filters: Filters, max_wait_minutes: int, limit: int, cursor: str | None = None,
             now: dt.datetime | None = None) -> Section:
    """Returns one page of the rows matching `filters` in their sort order, starting where `cursor` says."""
    now = now or utcnow()
    name = f"filter-{filters.sort}"
    at = decode(cursor, section=name) if cursor else None
    cutoff = at.cutoff if at and at.cutoff else overdue_cutoff(now, max_wait_minutes).replace(second=0, microsecond=0)
    columns, descending = _ORDER[filters.sort]
    where = _conditions(filters, cutoff=cutoff)
    query = select(WorklistRow).where(*where)
    if at is not None and at.key:
        query = query.where(wl._after(columns, at.key, descending=descending))
    query = query.order_by(*[c.desc() if descending else c for c in columns]).limit(limit + 1)
    rows = list(session.scalars(query))
    more, rows = len(rows) > limit, rows[:limit]
    section = READ if filters.read else UNREAD
    entries = wl._row_entries(session, rows, section, [None] * len(rows), max_wait_minutes=max_wait_minutes,
                              now=now)
    total = session.scalar(select(func.count()).select_from(WorklistRow).where(*where)) or 0
    offset = at.offset if at else 0
    nxt = None
    if more and rows:
        key = tuple(getattr(rows[-1], c.key) for c in columns)
        nxt = Cursor(name, key, None, offset + len(rows), cutoff).encode()
    return Section(section, entries, total, nxt, offset)
