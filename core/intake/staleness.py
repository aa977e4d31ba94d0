"""The stale sweep's rule: which unfinished studies the ingester sends to the broker again.

Re-sending is the safety net for a lost broker message or a worker that died holding a claim. It must not
re-send healthy work: under a backlog queued studies wait in the broker legitimately, and a live worker's
claim must not be taken over by a second delivery. Duplicates the rule still sends are harmless (claim tokens
keep a study scored once), only wasteful.
"""
from __future__ import annotations

import datetime as dt
import os
import socket

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from core.models import Status, Study, WorkerHeartbeat


def stale_study_ids(session: Session, *, now: dt.datetime, requeue_after_seconds: float,
                    worker_alive_seconds: float, claim_timeout_seconds: float) -> list[int]:
    """Returns the queued or processing studies to send again, oldest first.

    - Never sent (the broker was down when it was ingested): at once.
    - Otherwise only when its last send is older than `requeue_after_seconds` (so at most one re-send per
      period), and then:
      - PROCESSING: its claim (started_at) is older than `requeue_after_seconds` too, and either the claiming
        worker (studies.worker, the host:pid of the pool process, which is also its heartbeat name) has no
        heartbeat within `worker_alive_seconds` (it died holding the claim), or the claim is older than
        `claim_timeout_seconds` (a hung task whose heartbeat thread still runs). A live worker's claim is left
        alone.
      - QUEUED: its message looks lost rather than waiting behind a backlog. The broker queue is first in,
        first out, so it is lost when a study sent after it (by last send) has already been claimed since that
        send; and when no study at all was claimed within `requeue_after_seconds`, nothing is consuming (no
        worker, a worker still without a model, a broker that lost its messages), so every old one is re-sent.

    The claim activity is read from the studies received since the oldest unfinished one (a primary-key range),
    so the sweep's cost follows the backlog, not the size of the table.
    """
    cutoff = now - dt.timedelta(seconds=requeue_after_seconds)
    alive_since = now - dt.timedelta(seconds=worker_alive_seconds)
    hung_before = now - dt.timedelta(seconds=claim_timeout_seconds)
    pending = session.execute(
        select(Study.id, Study.status, Study.enqueued_at, Study.started_at, WorkerHeartbeat.last_seen)
        .outerjoin(WorkerHeartbeat, WorkerHeartbeat.name == Study.worker)
        .where(Study.status.in_([Status.QUEUED, Status.PROCESSING])).order_by(Study.id)).all()
    if not pending:
        return []
    last_claim, frontier = session.execute(
        select(func.max(Study.started_at),
               func.max(case((Study.started_at >= Study.enqueued_at, Study.enqueued_at))))
        .where(Study.id >= pending[0].id)).one()
    stalled = last_claim is None or last_claim < cutoff

    def stale(row) -> bool:
        if row.enqueued_at is None:
            return True
        if row.enqueued_at >= cutoff:
            return False
        if row.status == Status.PROCESSING:
            if row.started_at is None:
                return True  # processing without a claim time: no claim to protect
            if row.started_at >= cutoff:
                return False
            worker_dead = row.last_seen is None or row.last_seen < alive_since
            return worker_dead or row.started_at < hung_before
        overtaken = frontier is not None and row.enqueued_at < frontier
        return stalled or overtaken

    return [row.id for row in pending if stale(row)]


def holder_is_alive(session: Session, *, study_id: int, me: str, now: dt.datetime, worker_alive_seconds: float,
                    claim_timeout_seconds: float) -> str | None:
    """Returns the name of the live worker holding a study's claim, or None when it may be claimed now.

    A second delivery of a study a live worker is scoring (a batch companion's own message, a duplicate send)
    must not take the claim over: the holder would lose its result and the study be scored twice. A holder is
    dead when its heartbeat is older than `worker_alive_seconds`, when it is a process of this machine that no
    longer exists (a pool child that crashed: its task comes straight back, before the heartbeat ages), or
    when its claim is older than `claim_timeout_seconds` (hung).
    """
    row = session.execute(
        select(Study.status, Study.worker, Study.started_at, WorkerHeartbeat.last_seen)
        .outerjoin(WorkerHeartbeat, WorkerHeartbeat.name == Study.worker).where(Study.id == study_id)).first()
    if row is None or row.status != Status.PROCESSING or not row.worker or row.worker == me:
        return None
    if row.started_at is None or row.started_at < now - dt.timedelta(seconds=claim_timeout_seconds):
        return None
    if row.last_seen is None or row.last_seen < now - dt.timedelta(seconds=worker_alive_seconds):
        return None
    host, _, pid = row.worker.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _process_exists(int(pid)):
        return None
    return row.worker


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
