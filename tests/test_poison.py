"""Poison films: a film whose processing kills the worker process is claimed at most max_claims times, then
fails with the reason and goes to quarantine; its batch-mates are scored and the pool keeps working.

Real `celery worker` processes on Redis + PostgreSQL and on the embedded SQLite broker; the crash is the
`debug_crash_marker` fault injection (os._exit in the pool process, as a crashing decoder would end it).
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from core.db import get_engine
from core.intake.ingest import ingest_file
from core.migrate import upgrade
from core.models import Status
from core.settings import Settings
from tests.services import fresh_postgres_database
from tests.test_worker import Stack, redis_stack, variant
from worker.app import SCORE_BATCH, create_celery

MARKER = "poison"
CRASH_EXIT = "exited with 'exitcode 70'"  # what the pool logs for each pool process the marker ended


def _worker_env(stack: Stack, max_claims: int) -> dict[str, str]:
    return {**stack.env(), "CHESTAID_DEBUG_CRASH_MARKER": MARKER, "CHESTAID_MAX_CLAIMS": str(max_claims),
            "CHESTAID_PRECISION": "fp32"}


def _ingest_unsent(stack: Stack, name: str, data: bytes) -> int:
    """Ingests a film without sending it, so the test chooses how it reaches the broker."""
    path = stack.settings.inbox / name
    path.write_bytes(data)
    return ingest_file(path, settings=stack.settings, enqueue=lambda _sid: None, wait=False)


def _assert_poison_contained(stack: Stack, sid: int, max_claims: int) -> None:
    row = stack.wait_status(sid, Status.FAILED, timeout=240)
    assert row.error == f"worker died {max_claims} times while processing this file"
    assert row.claim_count == max_claims
    assert row.stored_path.startswith("quarantine/")
    assert (stack.settings.data_dir / row.stored_path).is_file()
    assert list(stack.settings.archive_dir.rglob(Path(row.stored_path).name)) == []
    assert (row.logit, row.heatmap_path) == (None, None)
    logs = stack.logs()
    assert sum(w.log().count(CRASH_EXIT) for w in stack.workers) == max_claims, logs
    assert f"study {sid} failed: worker died {max_claims} times" in logs


@pytest.mark.services
def test_poison_film_in_a_batch_on_redis_and_postgres(tmp_path, postgres_url, redis_url, bundle_dir):
    with fresh_postgres_database(postgres_url) as db:  # a queue of its own: redis_stack names one per test
        stack = redis_stack(tmp_path, db, redis_url, bundle_dir)
        try:
            worker = stack.start_worker(_worker_env(stack, max_claims=3))
            first = _ingest_unsent(stack, "first.png", variant(0, 11))
            poison = _ingest_unsent(stack, f"film-{MARKER}.png", variant(1, 12))
            last = _ingest_unsent(stack, "last.png", variant(2, 13))
            create_celery(stack.settings).send_task(SCORE_BATCH, args=[[first, poison, last]])

            _assert_poison_contained(stack, poison, max_claims=3)
            # The batch died with the poison film in it; the redeliveries scored its neighbours one at a time.
            for sid in (first, last):
                row = stack.wait_status(sid, Status.SCORED)
                assert row.claim_count == 2 and row.heatmap_path == f"heatmaps/{sid}.png"
            assert worker.alive()
            assert "scoring [" in worker.log() and "one at a time" in worker.log()

            later = stack.drop("later.png", variant(3, 14))  # the pool replaced the dead process
            assert stack.wait_status(later, Status.SCORED).claim_count == 1
            assert stack.study(poison).status == Status.FAILED  # never sent again
        finally:
            stack.stop()


def test_poison_film_on_the_embedded_sqlite_broker(tmp_path, bundle_dir):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", model_dir=bundle_dir,
                        stable_seconds=0, task_queue=f"test-{uuid.uuid4().hex[:8]}")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    stack = Stack(settings, tmp_path)
    try:
        worker = stack.start_worker(_worker_env(stack, max_claims=2))
        poison = stack.drop(f"{MARKER}-film.png", variant(4, 21))
        _assert_poison_contained(stack, poison, max_claims=2)
        assert worker.alive()

        good = stack.drop("good.png", variant(5, 22))
        row = stack.wait_status(good, Status.SCORED)
        assert (row.claim_count, row.enqueue_count) == (1, 1)
        assert stack.study(poison).enqueue_count == 1  # redelivered by the broker, not re-sent
    finally:
        stack.stop()
        get_engine(settings.database_url).dispose()


def test_a_claim_given_back_after_an_exception_does_not_count_as_a_death(tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import worker.tasks as tasks
    from core import repository as repo
    from core.db import session_scope

    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", task_max_retries=2, max_claims=2)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        sid = repo.create_study(session, source_name="a.png", sha256="a" * 64, size_bytes=1,
                                stored_path="archive/a.png").id
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    tokens = []

    def claims_then_loses_the_database(study_ids, *, settings):
        with session_scope(settings.database_url) as session:
            tokens.append(repo.claim_study(session, study_id=study_ids[0], worker=tasks.worker_name(),
                                           max_claims=settings.max_claims))
        raise OperationalError("UPDATE studies", {}, Exception("database restarting"))
    monkeypatch.setattr(tasks, "run_scoring", claims_then_loses_the_database)
    with pytest.raises(OperationalError):
        tasks.score_study.apply(args=[sid]).get()
    # Three attempts each took a claim although max_claims is 2: every one was given back, none is a death.
    assert len(tokens) == 3 and all(tokens)
    with session_scope(settings.database_url) as session:
        row = session.get(repo.Study, sid)
        assert (row.status, row.claim_count, row.claim_token) == (Status.QUEUED, 0, None)
    get_engine(settings.database_url).dispose()
