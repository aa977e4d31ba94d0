"""The stale sweep's rule (core.intake.staleness) on SQLite and Postgres: judged from the claim and the claiming
worker's heartbeat, and from whether a queued study's message looks lost rather than waiting in a backlog."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import update

from core import repository as repo
from core.db import session_scope
from core.intake.staleness import stale_study_ids
from core.models import Status, Study, WorkerHeartbeat, utcnow

REQUEUE, ALIVE, TIMEOUT = 300, 60, 1800
NOW = utcnow()


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def add(url: str, *, status: str, enqueued: float | None, started: float | None = None,
        worker: str | None = None) -> int:
    """Adds a study in the given state; times are seconds before NOW (None: never)."""
    with session_scope(url) as s:
        n = s.query(Study).count()
        sid = repo.create_study(s, source_name=f"{n}.png", sha256=f"{n:064d}", size_bytes=1,
                                stored_path=f"archive/{n}.png").id
        s.execute(update(Study).where(Study.id == sid).values(
            status=status, worker=worker, enqueued_at=None if enqueued is None else ago(enqueued),
            started_at=None if started is None else ago(started)))
    return sid


def beat(url: str, name: str, seconds_ago: float) -> None:
    with session_scope(url) as s:
        s.add(WorkerHeartbeat(name=name, model_version="m", device="cpu fp32", last_seen=ago(seconds_ago)))


def stale(url: str) -> list[int]:
    with session_scope(url) as s:
        return stale_study_ids(s, now=NOW, requeue_after_seconds=REQUEUE, worker_alive_seconds=ALIVE,
                               claim_timeout_seconds=TIMEOUT)


def test_a_live_workers_claim_is_kept_and_a_dead_workers_claim_is_resent(db_url):
    beat(db_url, "host:1", 5)  # alive
    beat(db_url, "host:2", ALIVE + 30)  # stopped beating: died
    live = add(db_url, status=Status.PROCESSING, enqueued=1000, started=900, worker="host:1")
    dead = add(db_url, status=Status.PROCESSING, enqueued=1000, started=900, worker="host:2")
    vanished = add(db_url, status=Status.PROCESSING, enqueued=1000, started=900, worker="host:3")  # no heartbeat
    hung = add(db_url, status=Status.PROCESSING, enqueued=TIMEOUT + 200, started=TIMEOUT + 100, worker="host:1")
    add(db_url, status=Status.PROCESSING, enqueued=1000, started=REQUEUE - 60, worker="host:2")  # fresh claim
    add(db_url, status=Status.PROCESSING, enqueued=20, started=900, worker="host:2")  # re-sent just now
    add(db_url, status=Status.SCORED, enqueued=1000, started=900, worker="host:2")
    assert stale(db_url) == [dead, vanished, hung]
    assert live not in stale(db_url)


def test_queued_studies_waiting_behind_a_backlog_are_not_resent(db_url):
    beat(db_url, "host:1", 2)
    lost = add(db_url, status=Status.QUEUED, enqueued=700)  # sent before the study being scored now
    head = add(db_url, status=Status.PROCESSING, enqueued=600, started=1, worker="host:1")
    waiting = [add(db_url, status=Status.QUEUED, enqueued=500 - i) for i in range(3)]
    unsent = add(db_url, status=Status.QUEUED, enqueued=None)  # the broker was down at ingest
    recent = add(db_url, status=Status.QUEUED, enqueued=10)
    assert stale(db_url) == [lost, unsent]
    assert not {head, recent, *waiting} & set(stale(db_url))

    # A study sent after the waiting ones has been scored meanwhile: theirs were lost after all.
    later = add(db_url, status=Status.SCORED, enqueued=450, started=3, worker="host:1")
    assert stale(db_url) == [lost, *waiting, unsent]
    assert later not in stale(db_url)


def test_queued_studies_are_resent_when_nothing_has_been_claimed_for_a_while(db_url):
    # No worker took anything within requeue_after_seconds (none running, or the broker lost its messages).
    old = [add(db_url, status=Status.QUEUED, enqueued=REQUEUE + 10 * i) for i in range(1, 3)]
    add(db_url, status=Status.QUEUED, enqueued=REQUEUE - 10)
    add(db_url, status=Status.SCORED, enqueued=5000, started=REQUEUE + 60)
    assert stale(db_url) == old
