"""The Celery application, configured from Chest-Aid settings: `celery -A worker.app worker`."""
from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from celery import Celery
from kombu.common import maybe_declare

from core.settings import Settings, get_settings

SCORE_STUDY = "worker.tasks.score_study"
SCORE_BATCH = "worker.tasks.score_batch"
EMBEDDED_PREFETCH = 8

log = logging.getLogger(__name__)


def _transport_options(url: str, settings: Settings) -> dict:
    """Returns per-transport options: a visibility timeout for Redis/SQS (unknown to the SQLAlchemy transport),
    a busy timeout for the embedded SQLite broker."""
    if url.startswith(("redis", "rediss", "sentinel", "sqs")):
        return {"visibility_timeout": settings.broker_visibility_timeout}
    if url.startswith("sqla+sqlite"):
        # They go to create_engine: SQLite's busy wait of 30 s instead of 5, as for the application database
        # (core.db), since ingester, worker and web all write to this file.
        return {"connect_args": {"timeout": 30}}
    return {}


def _fast_embedded_polling() -> None:
    """Makes kombu's SQLAlchemy transport poll every 0.1 s instead of 1 s (about a second per study).

    Its transport options all go to create_engine, so polling_interval cannot be passed that way.
    """
    from kombu.transport.sqlalchemy import Transport

    Transport.polling_interval = 0.1


def _guarded_embedded_channel() -> None:
    """Makes kombu's SQLAlchemy transport safe for the two threads of a worker's main process that use it.

    Each channel has one SQLAlchemy session, used by the consumer (fetching) and, when a pool process dies, by
    the thread that puts its unacknowledged message back (`_restore` → `_put`). A session is not thread-safe:
    the two interleaved left it 'prepared' or 'closed' mid-commit, after which every fetch raised and the worker
    never took another message (tests/test_poison.py and the storm test, under load). And Channel._get commits
    in a `finally` with no rollback, so one failed commit (SQLite busy) did the same (celery/kombu#1185). Here
    every session use holds one lock, and a failure rolls the session back; the message a failed fetch had
    marked taken is rolled back with it and stays queued.
    """
    from kombu.transport.sqlalchemy import Channel
    from kombu.transport.virtual import Empty

    if getattr(Channel._get, "chestaid_guarded", False):
        return
    lock = threading.RLock()  # re-entrant: _restore calls _put

    def guarded(method):
        def call(self, *args, **kwargs):
            with lock:
                try:
                    return method(self, *args, **kwargs)
                except Empty:
                    raise
                except Exception:
                    self.session.rollback()
                    raise
        call.chestaid_guarded = True
        return call
    for name in ("_get", "_put", "_purge", "_size", "_restore", "_new_queue"):
        setattr(Channel, name, guarded(getattr(Channel, name)))


def _embedded_broker_file(path: Path) -> None:
    """Creates the embedded broker's folder (kombu creates the file, not its folder) and puts the file in WAL
    mode, which SQLite keeps in the file. In its default rollback-journal mode a worker's fetch could not
    commit while another process read the file, and each publish created, synced and deleted a journal: in WAL
    readers never block the commit (an ingest profile also showed about 2 ms less CPU per film, within its noise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:  # another process holds it: it is doing the same, or already did
        log.warning("could not set WAL mode on the broker file %s: %s", path, exc)


def _prefetch(url: str) -> int:
    """Messages a worker process reserves ahead. One on a shared broker, so an idle worker elsewhere takes the
    next study. On the embedded broker (one machine) a few: kombu's SQLAlchemy transport sleeps a polling
    interval after each message when none may be fetched, and in a burst most messages name studies a batch
    already scored (skipped at once), so with one reserved the worker spent about half a burst asleep."""
    return EMBEDDED_PREFETCH if url.startswith("sqla+") else 1


def create_celery(settings: Settings | None = None) -> Celery:
    """Builds the Celery app for these settings (the broker defaults to kombu's SQLite transport)."""
    settings = settings or get_settings()
    if settings.broker_url.startswith("sqla+sqlite:///"):
        _embedded_broker_file(Path(settings.broker_url.removeprefix("sqla+sqlite:///")))
    if settings.broker_url.startswith("sqla+"):
        _fast_embedded_polling()
        _guarded_embedded_channel()
    app = Celery("chestaid", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.task_queue,
        task_serializer="json",
        accept_content=["json"],
        # Results live in the database, not in a Celery result backend.
        task_ignore_result=True,
        # Ack only after the task ran, and put the message back if the worker process died mid-task,
        # so a killed worker's study is redelivered (the claim token keeps it scored once).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=_prefetch(settings.broker_url),
        broker_transport_options=_transport_options(settings.broker_url, settings),
        broker_connection_retry_on_startup=True,
        # Each pool process loads the model at start-up; on a busy CPU that exceeds the 4 s default.
        worker_proc_alive_timeout=300,
        worker_hijack_root_logger=True,
    )
    return app


celery_app = create_celery()
app = celery_app  # the name `celery -A worker.app` looks for


def warm_up(app: Celery = celery_app) -> bool:
    """Readies the ingester's broker connection before the first film, so a burst's first message goes out as
    fast as the rest; returns whether the broker answered.

    Done lazily, the first send_task imports the transport (the redis client alone took 0.19 s), resolves the
    (disabled) result backend, connects and declares the queue: measured 0.20 s on the embedded broker and
    0.26–0.33 s on Redis, against 2–15 ms for later messages, while the burst's first films wait and the pool
    idles. A broker that is down is only logged: studies stay queued and are sent once it is back."""
    try:
        app.backend  # noqa: B018  (resolving it loads its module, as the first send_task would)
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            maybe_declare(app.amqp.queues[app.conf.task_default_queue], producer.channel)
        return True
    except Exception as exc:
        log.warning("the broker did not answer at start (%s); studies stay queued and are sent once it does", exc)
        return False


def make_enqueue(app: Celery = celery_app) -> Callable[[int], None]:
    """Returns the ingester's enqueue callback: send score_study(study_id) to the broker."""
    def enqueue(study_id: int) -> None:
        app.send_task(SCORE_STUDY, args=[int(study_id)])
    return enqueue


def make_enqueue_group(app: Celery = celery_app) -> Callable[[list[int]], None]:
    """Returns the ingester's group callback (core.intake.sender): one score_batch message for several studies
    committed together, score_study for one."""
    def enqueue_group(study_ids: list[int]) -> None:
        ids = [int(s) for s in study_ids]
        if len(ids) == 1:
            app.send_task(SCORE_STUDY, args=ids)
        else:
            app.send_task(SCORE_BATCH, args=[ids])
    return enqueue_group
