"""Soft "being read by" marks: who has a study open, shown to others on the worklist and the study
page. A mark never blocks anyone; it is kept fresh by the open page and expires when the page goes away."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.models import ReadingClaim, utcnow
from core.worklist_entries import as_utc


@dataclass(frozen=True)
class Reader:
    """Someone with a study open, and for how long."""

    user_name: str
    opened_at: dt.datetime
    minutes: int  # whole minutes open, as shown ("for 2 min")


def mark_open(session: Session, *, study_id: int, user_id: int, user_name: str, expire_seconds: int,
              now: dt.datetime | None = None) -> None:
    """Records (or refreshes) that `user_name` has the study open. A mark that had expired starts afresh."""
    now = now or utcnow()
    claim = session.scalar(select(ReadingClaim).where(ReadingClaim.study_id == study_id,
                                                      ReadingClaim.user_id == user_id))
    if claim is None:
        prune(session, expire_seconds=expire_seconds, now=now)  # new marks clear out long-dead ones (an index range)
        try:
            with session.begin_nested():  # two tabs of one user opening at once: the second refreshes
                session.add(ReadingClaim(study_id=study_id, user_id=user_id, user_name=user_name, opened_at=now,
                                         seen_at=now))
            return
        except IntegrityError:
            claim = session.scalar(select(ReadingClaim).where(ReadingClaim.study_id == study_id,
                                                              ReadingClaim.user_id == user_id))
    if as_utc(claim.seen_at) < now - dt.timedelta(seconds=expire_seconds):
        claim.opened_at = now
    claim.seen_at = now


def readers(session: Session, *, study_ids: Iterable[int], expire_seconds: int, exclude_user_id: int | None = None,
            now: dt.datetime | None = None) -> dict[int, list[Reader]]:
    """Returns the live marks of the given studies (one query), longest open first, leaving out one user's."""
    now = now or utcnow()
    wanted = set(study_ids)
    if not wanted:
        return {}
    # The live marks only (the seen_at index; a handful at any moment), filtered here: the statement is the same
    # for every page, where an IN list of the page's ids would be a new statement for each page length.
    query = select(ReadingClaim).where(ReadingClaim.seen_at >= now - dt.timedelta(seconds=expire_seconds))
    if exclude_user_id is not None:
        query = query.where(ReadingClaim.user_id != exclude_user_id)
    found: dict[int, list[Reader]] = {}
    for c in session.scalars(query.order_by(ReadingClaim.opened_at, ReadingClaim.id)):
        if c.study_id not in wanted:
            continue
        opened = as_utc(c.opened_at)
        found.setdefault(c.study_id, []).append(
            Reader(c.user_name, opened, max(0, int((now - opened).total_seconds() // 60))))
    return found


def prune(session: Session, *, expire_seconds: int, now: dt.datetime | None = None) -> int:
    """Deletes marks expired for a day or more (they are never shown); returns how many."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=expire_seconds) - dt.timedelta(days=1)
    return session.execute(delete(ReadingClaim).where(ReadingClaim.seen_at < cutoff)).rowcount or 0
