"""Everything a worklist page's content depends on, read in four small statements instead of building the page.

A page or its polled fragment is a function of: the studies and worklist rows (whose committed changes all
move `worklist_version.n`, by database triggers: migration 0008), which unread rows are past the wait limit
(the exact cut-off marks rows OVERDUE; the cut-off floored to the minute orders and filters them), who has
which study open, which workers are alive and with which model, and the active calibration. Waiting times
and "open for N min" are not in it: the page shows them as ticking <time> labels that the browser advances
(web/static/app.js), so they are left out of the page's version too (web.poll).

So two equal states mean an equal page, and the poll can answer 304 from the state alone.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import Calibration, ReadingClaim, WorkerHeartbeat, WorklistRow, WorklistVersion
from core.worklist_entries import overdue_cutoff
from core.worklist_sections import UNREAD


def data_version(session: Session) -> int:
    """The worklist's change counter: it moves with every committed write to the studies or worklist rows."""
    return session.scalar(select(WorklistVersion.n).where(WorklistVersion.id == 1)) or 0


def worklist_state(session: Session, *, now: dt.datetime, max_wait_minutes: int, worker_alive_seconds: int,
                   reading_expire_seconds: int, viewer_id: int | None) -> tuple:
    """Returns a value that changes whenever a worklist page shown to this viewer at `now` would change (apart
    from the ticking labels): the data version and the time-driven facts listed in the module docstring."""
    exact = overdue_cutoff(now, max_wait_minutes)
    floored = exact.replace(second=0, microsecond=0)
    # The unread rows inside the wait limit, by either cut-off: a short index range (ix_worklist_rows_arrival).
    # A row crossing either cut-off lowers a count; a row arriving moves the data version as well.
    within = session.execute(
        select(func.count(), func.count().filter(WorklistRow.received_at >= exact))
        .where(WorklistRow.section == UNREAD, WorklistRow.received_at >= floored)).one()
    marks = select(ReadingClaim.study_id, ReadingClaim.user_name, ReadingClaim.opened_at).where(
        ReadingClaim.seen_at >= now - dt.timedelta(seconds=reading_expire_seconds))
    if viewer_id is not None:
        marks = marks.where(ReadingClaim.user_id != viewer_id)
    workers = select(WorkerHeartbeat.name, WorkerHeartbeat.model_version).where(
        WorkerHeartbeat.last_seen >= now - dt.timedelta(seconds=worker_alive_seconds))
    calibration = select(Calibration.version, Calibration.model_version, Calibration.threshold).where(
        Calibration.active.is_(True))
    return (data_version(session), tuple(within),
            tuple(sorted((m.study_id, m.user_name, m.opened_at.isoformat()) for m in session.execute(marks))),
            tuple(sorted((w.name, w.model_version or "") for w in session.execute(workers))),
            tuple(session.execute(calibration).first() or ()))
