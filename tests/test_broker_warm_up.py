"""The ingester readies its broker connection at start (worker.app.warm_up): the queue is declared before any
film arrives, on Redis and on the embedded broker, and a broker that is down is reported, never fatal."""
from __future__ import annotations

import logging
import sqlite3
import uuid

import redis

from core.settings import Settings
from worker.app import create_celery, make_enqueue_group, warm_up


def test_warm_up_declares_the_queue_on_redis_before_any_message(tmp_path, redis_url):
    queue = f"test-warm-{uuid.uuid4().hex[:8]}"
    app = create_celery(Settings(data_dir=tmp_path / "var", broker_url=redis_url, task_queue=queue))
    client = redis.Redis.from_url(redis_url)
    binding = f"_kombu.binding.{queue}"
    try:
        assert not client.exists(binding)
        assert warm_up(app) is True
        assert any(queue in m.decode() for m in client.smembers(binding))  # declared: bound to its exchange
        assert client.llen(queue) == 0  # and nothing was sent
        make_enqueue_group(app)([5, 6])
        assert client.llen(queue) == 1  # the first real message goes to the declared queue
    finally:
        client.delete(binding, queue)


def test_warm_up_creates_the_queue_on_the_embedded_broker(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", task_queue="warm-embedded")
    settings.ensure_dirs()
    app = create_celery(settings)
    assert warm_up(app) is True
    broker_file = settings.broker_url.removeprefix("sqla+sqlite:///")
    with sqlite3.connect(broker_file) as db:
        assert db.execute("SELECT name FROM kombu_queue").fetchall() == [("warm-embedded",)]
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,)


def test_a_broker_that_is_down_at_start_is_logged_and_not_fatal(tmp_path, caplog):
    app = create_celery(Settings(data_dir=tmp_path / "var", broker_url="redis://127.0.0.1:1/0"))
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        assert warm_up(app) is False
    assert "the broker did not answer at start" in caplog.text
    assert "studies stay queued" in caplog.text
