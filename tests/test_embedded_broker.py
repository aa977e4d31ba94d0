"""The embedded broker (kombu's SQLAlchemy transport on SQLite) survives a failed fetch: the worker keeps
taking messages, and the message of the failed fetch stays queued."""
from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from core.settings import Settings
from worker.app import create_celery


def test_a_fetch_whose_commit_fails_is_rolled_back_and_the_next_fetch_gets_the_message(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox")
    app = create_celery(settings)
    assert app.conf.broker_transport_options == {"connect_args": {"timeout": 30}}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel._put("scoring", {"body": "study 7"})
        engine = channel.session.get_bind()
        failures = []

        def locked(connection):  # as SQLite answers a commit while another process holds the file
            if not failures:
                failures.append(1)
                raise sqlite3.OperationalError("database is locked")
        event.listen(engine, "commit", locked)
        try:
            with pytest.raises((OperationalError, sqlite3.OperationalError)):
                channel._get("scoring")  # marked the message taken, then could not commit
        finally:
            event.remove(engine, "commit", locked)
        # kombu alone leaves its session 'prepared' here and every later fetch raises InvalidRequestError.
        assert channel._get("scoring") == {"body": "study 7"}


def test_the_embedded_broker_file_is_in_wal_mode(tmp_path):
    """Readers never block a fetch's commit, and a publish writes no journal file of its own."""
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox")
    create_celery(settings)
    path = tmp_path / "var" / "broker.db"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    create_celery(settings)  # again, as each process does at start: still fine
    app = create_celery(settings)
    with app.connection_for_write() as conn:
        conn.default_channel._put("scoring", {"body": "study 8"})
        assert conn.default_channel._get("scoring") == {"body": "study 8"}


def test_one_channel_used_from_two_threads_loses_and_breaks_nothing(tmp_path):
    """A worker's consumer fetches while another thread puts back a dead pool process's message, on one
    channel and one session: every message is fetched once and the channel keeps working."""
    import threading
    from kombu.transport.virtual import Empty

    app = create_celery(Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox"))
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel._new_queue("scoring")
        errors, got = [], []

        def put_back():
            try:
                for i in range(150):
                    channel._put("scoring", {"body": f"m{i}"})  # what _restore does with a message
            except Exception as exc:  # noqa: BLE001 (any error is the failure this test looks for)
                errors.append(exc)
        putter = threading.Thread(target=put_back)
        putter.start()
        deadline = time.monotonic() + 60
        while len(got) < 150 and time.monotonic() < deadline and not errors:
            try:
                got.append(channel._get("scoring")["body"])
            except Empty:
                time.sleep(0.001)
        putter.join()
        assert errors == [] and sorted(got) == sorted(f"m{i}" for i in range(150))
