"""The worklist: which studies a reader sees, in which order, and the status strip above them.

Unread order (studies with status ``scored`` and no recorded finding), paged with keyset cursors
(core.cursor) that keep the first page's overdue cut-off:

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

**DICOM studies.** The images of one DICOM study (same patient and Study Instance UID: a UID that two
patients share is a sender error and never merges them) are one row in the unread and read sections: its
risk is the highest score among its scored images (refused laterals are never scored, so they never count),
it is flagged if any image is, and it waits since its earliest unread image arrived. ``Entry.study`` is the
row's lead image (the highest score), ``Entry.images`` all its images in that section. Films without a
Study Instance UID (PNG/JPEG) are rows of their own. Each image stays one Study row with its own status,
score and finding; the rows' aggregates are kept in ``worklist_rows`` (core.worklist_rows) so that every
list here is read as one index range per page, in the same order on SQLite and Postgres.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import replace

from sqlalchemy import Integer, String, false, func, literal, or_, select, true, tuple_
from sqlalchemy.orm import Session

from core import calibrations, worklist_rows
from core import repository as repo
from core.cursor import Cursor, decode
from core.db import one_of
from core.models import Status, Study, WorklistRow, utcnow
from core.worklist_entries import (TIER_FLAGGED, TIER_OVERDUE, TIER_ROUTINE, Entry, Section,  # noqa: F401 (API)
                                   StatusStrip, as_utc, overdue_cutoff, entry_for, group_entry, is_unread, key_of,
                                   section_of, waiting_seconds)
from core.worklist_sections import (DUPLICATES, FAILED, GROUPED_SECTIONS, IN_PROGRESS, READ, REFUSED, SEARCH,
                                    SECTIONS, UNREAD)

# --- pages ------------------------------------------------------------------------------------------
# Every list is read as one index range from where the previous page ended (keyset paging), so a page costs
# the same at 100 or 100,000 studies and rows arriving meanwhile never shift or repeat the rows already paged.

_UNREAD_ORDER = {
    TIER_FLAGGED: (WorklistRow.neg_score, WorklistRow.received_at, WorklistRow.first_id),
    TIER_OVERDUE: (WorklistRow.received_at, WorklistRow.neg_score, WorklistRow.first_id),
    TIER_ROUTINE: (WorklistRow.neg_score, WorklistRow.received_at, WorklistRow.first_id),
}
_READ_ORDER = (WorklistRow.feedback_at, WorklistRow.first_id)  # descending
_PLAIN = {  # section: (statuses, newest first?)
    IN_PROGRESS: ((Status.QUEUED, Status.PROCESSING), False), REFUSED: ((Status.REFUSED,), True),
    FAILED: ((Status.FAILED,), True), DUPLICATES: ((Status.DUPLICATE,), True),
}


def _after(columns, key, *, descending: bool = False):
    """Rows strictly after key in the order of columns (one row-value comparison an index range serves)."""
    bound = tuple_(*[literal(v, c.type) for c, v in zip(columns, key)])
    return tuple_(*columns) < bound if descending else tuple_(*columns) > bound


def _tier_filter(tier: int, cutoff: dt.datetime):
    if tier == TIER_FLAGGED:
        return (WorklistRow.flagged == true(),)
    arrival = WorklistRow.received_at < cutoff if tier == TIER_OVERDUE else WorklistRow.received_at >= cutoff
    return (WorklistRow.flagged == false(), arrival)


def _members(session: Session, rows: list[WorklistRow], section: str) -> dict[str, list[Study]]:
    """Loads the images of a page of rows in one query (bounded by the page, never the table)."""
    keys = [r.group_key for r in rows]
    uids = {k.partition("|")[0] for k in keys if not k.startswith("#")}
    ids = [int(k[1:]) for k in keys if k.startswith("#")]
    found: dict[str, list[Study]] = {k: [] for k in keys}
    query = select(Study).where(Study.status == Status.SCORED,
                                or_(one_of(session, Study.study_instance_uid, uids, String),
                                    one_of(session, Study.id, ids, Integer)))
    for study in session.scalars(query):
        if section_of(study) == section and key_of(study) in found:
            found[key_of(study)].append(study)
    return found


def _row_entries(session, rows, section, tiers, *, max_wait_minutes, now) -> list[Entry]:
    members = _members(session, rows, section)
    out = []
    for row, tier in zip(rows, tiers):
        if members[row.group_key]:  # a row changed by a concurrent write between the two reads is left out
            entry = group_entry(members[row.group_key], max_wait_minutes=max_wait_minutes, now=now)
            out.append(replace(entry, tier=tier) if section == UNREAD else entry)
    return out


def _page_cursor(section, key, tier, offset, cutoff, more: bool) -> str | None:
    return Cursor(section, tuple(key), tier, offset, cutoff).encode() if more else None


def _unread_page(session, *, cursor: Cursor | None, limit: int | None, max_wait_minutes, now):
    # The first page's cut-off, to the minute: pages of one listing share it, and so does a poll within the
    # same minute (an unchanged worklist keeps its version; the waiting times shown move by the minute too).
    cutoff = cursor.cutoff if cursor else overdue_cutoff(now, max_wait_minutes).replace(second=0, microsecond=0)
    rows: list[tuple[int, WorklistRow]] = []
    for tier in (TIER_FLAGGED, TIER_OVERDUE, TIER_ROUTINE):
        if cursor is not None and tier < cursor.tier:
            continue
        order = _UNREAD_ORDER[tier]
        query = select(WorklistRow).where(WorklistRow.section == UNREAD, *_tier_filter(tier, cutoff))
        if cursor is not None and tier == cursor.tier:
            query = query.where(_after(order, cursor.key))
        wanted = None if limit is None else limit + 1 - len(rows)  # one more tells whether a next page exists
        rows += [(tier, r) for r in session.scalars(query.order_by(*order).limit(wanted))]
        if limit is not None and len(rows) > limit:
            break
    more = limit is not None and len(rows) > limit
    rows = rows[:limit] if limit is not None else rows
    entries = _row_entries(session, [r for _, r in rows], UNREAD, [t for t, _ in rows],
                           max_wait_minutes=max_wait_minutes, now=now)
    offset = cursor.offset if cursor else 0
    last_tier, last = rows[-1] if rows else (None, None)
    key = [getattr(last, c.key) for c in _UNREAD_ORDER[last_tier]] if last is not None else []
    return entries, _page_cursor(UNREAD, key, last_tier, offset + len(rows), cutoff, more)


def _read_page(session, *, cursor: Cursor | None, limit: int | None, max_wait_minutes, now):
    query = select(WorklistRow).where(WorklistRow.section == READ)
    if cursor is not None:
        query = query.where(_after(_READ_ORDER, cursor.key, descending=True))
    rows = list(session.scalars(query.order_by(*[c.desc() for c in _READ_ORDER])
                                .limit(None if limit is None else limit + 1)))
    more = limit is not None and len(rows) > limit
    rows = rows[:limit] if limit is not None else rows
    entries = _row_entries(session, rows, READ, [None] * len(rows), max_wait_minutes=max_wait_minutes, now=now)
    key = [rows[-1].feedback_at, rows[-1].first_id] if rows else []
    return entries, _page_cursor(READ, key, None, (cursor.offset if cursor else 0) + len(rows), None, more)


def _plain_page(session, name, *, cursor: Cursor | None, limit: int | None, now):
    statuses, newest_first = _PLAIN[name]
    order = (Study.received_at, Study.id)
    studies = []
    # One query per status, merged here: `status IN (a, b)` cannot walk the (status, received_at, id) index in
    # order, so Postgres would read and sort every queued and processing study to return a page of them.
    for status in statuses:
        query = select(Study).where(Study.status == status)
        if cursor is not None:
            query = query.where(_after(order, cursor.key, descending=newest_first))
        query = query.order_by(*[c.desc() if newest_first else c for c in order])
        studies += session.scalars(query.limit(None if limit is None else limit + 1))
    if len(statuses) > 1:
        studies.sort(key=lambda s: (s.received_at, s.id), reverse=newest_first)
    more = limit is not None and len(studies) > limit
    studies = studies[:limit] if limit is not None else studies
    key = [studies[-1].received_at, studies[-1].id] if studies else []
    entries = [Entry(s, waiting_seconds(s, now=now), False) for s in studies]
    return entries, _page_cursor(name, key, None, (cursor.offset if cursor else 0) + len(studies), None, more)


def unread(session: Session, *, max_wait_minutes: int, now: dt.datetime | None = None,
           limit: int | None = None) -> list[Entry]:
    """Returns the first unread rows (a DICOM study or a film of its own) in reading order (module docstring)."""
    return _unread_page(session, cursor=None, limit=limit, max_wait_minutes=max_wait_minutes, now=now or utcnow())[0]


def section_totals(session: Session) -> dict[str, int]:
    """Returns the number of rows of every section: grouped ones from maintained counts, the others from
    per-status index counts (never a count over all scored studies)."""
    totals = worklist_rows.counts(session)
    statuses = [s for group, _ in _PLAIN.values() for s in group]
    by_status = dict(session.execute(select(Study.status, func.count()).where(Study.status.in_(statuses))
                                     .group_by(Study.status)).all())
    for name, (group, _) in _PLAIN.items():
        totals[name] = sum(by_status.get(s, 0) for s in group)
    totals.update({f"status:{s}": by_status.get(s, 0) for s in statuses})
    return totals


def section(session: Session, name: str, *, max_wait_minutes: int, now: dt.datetime | None = None,
            limit: int | None = None, cursor: str | None = None, total: int | None = None) -> Section:
    """Returns one page of a worklist section by name (one of SECTIONS), starting where `cursor` says (the
    first page without one); `limit` None lists the rest of the section. `total` saves recounting it."""
    if name not in SECTIONS:
        raise ValueError(f"unknown worklist section {name!r}; expected one of {SECTIONS}")
    now = now or utcnow()
    at = decode(cursor, section=name) if cursor else None
    if at is not None and not at.key:  # the start of the section
        at, cursor = None, None
    if name == UNREAD:
        entries, nxt = _unread_page(session, cursor=at, limit=limit, max_wait_minutes=max_wait_minutes, now=now)
    elif name == READ:
        entries, nxt = _read_page(session, cursor=at, limit=limit, max_wait_minutes=max_wait_minutes, now=now)
    else:
        entries, nxt = _plain_page(session, name, cursor=at, limit=limit, now=now)
    if total is None:
        total = section_totals(session)[name]
    return Section(name, entries, total, nxt, at.offset if at else 0)


def all_studies(session: Session, *, max_wait_minutes: int, now: dt.datetime | None = None) -> list[Entry]:
    """Returns every row once (every study once, within its row): the unread worklist in reading order, then
    the other sections."""
    now = now or utcnow()
    out: list[Entry] = []
    for name in SECTIONS:
        out.extend(section(session, name, max_wait_minutes=max_wait_minutes, now=now).entries)
    return out


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


def search(session: Session, *, q: str, max_wait_minutes: int, now: dt.datetime | None = None,
           limit: int, cursor: str | None = None) -> Section:
    """Finds studies by exact accession number, patient ID, file name or study id, newest first, one page."""
    now = now or utcnow()
    q = q.strip()
    match = [Study.accession_number == q, Study.patient_id == q, Study.source_name == q]
    if q.lstrip("#").isdigit() and len(q.lstrip("#")) < 10:
        match.append(Study.id == int(q.lstrip("#")))
    at = decode(cursor, section=SEARCH) if cursor else None
    query = select(Study).where(or_(*match))
    if at is not None:
        query = query.where(Study.id < at.key[0])
    studies = list(session.scalars(query.order_by(Study.id.desc()).limit(limit + 1)))
    more, studies = len(studies) > limit, studies[:limit]
    total = session.scalar(select(func.count()).select_from(Study).where(or_(*match))) or 0
    offset = at.offset if at else 0
    nxt = _page_cursor(SEARCH, [studies[-1].id] if studies else [], None, offset + len(studies), None, more)
    entries = [entry_for(s, max_wait_minutes=max_wait_minutes, now=now) for s in studies]
    return Section(SEARCH, entries, total, nxt, offset)


def status_strip(session: Session, *, worker_alive_seconds: int, max_wait_minutes: int,
                 now: dt.datetime | None = None, totals: dict[str, int] | None = None) -> StatusStrip:
    """Returns queue length, unread/overdue/read rows (a DICOM study counts once), failed/refused films, live
    workers and the active model and calibration; `totals` (section_totals) saves counting them again."""
    now = now or utcnow()
    totals = totals if totals is not None else section_totals(session)
    # Overdue rows are the unread ones minus those that arrived within the wait limit: a short index range.
    recent = session.scalar(select(func.count()).select_from(WorklistRow).where(
        WorklistRow.section == UNREAD, WorklistRow.received_at >= overdue_cutoff(now, max_wait_minutes))) or 0
    workers = repo.live_workers(session, within_seconds=worker_alive_seconds)
    cal = calibrations.active(session)
    return StatusStrip(
        now=as_utc(now), queued=totals[f"status:{Status.QUEUED}"], processing=totals[f"status:{Status.PROCESSING}"],
        unread=totals[UNREAD], overdue=max(0, totals[UNREAD] - recent), failed=totals[FAILED],
        read=totals[READ], workers_alive=len(workers), refused=totals[REFUSED], duplicates=totals[DUPLICATES],
        model_versions=sorted({w.model_version for w in workers if w.model_version}),
        calibration_version=cal.version if cal else None,
        calibration_model_version=cal.model_version if cal else None,
        threshold=cal.threshold if cal else None)
