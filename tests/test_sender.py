"""The ingester's group sender: films committed together share a message; `enqueued_at` only once it is out."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from core import repository as repo
from core.db import session_scope
from core.intake.ingest import requeue_stale
from core.intake.sender import GROUP_MAX, GroupSender
from core.intake.watcher import Ingester
from core.models import Status, Study
from core.settings import Settings
from tests.conftest import fixture_images
from tests.services import wait_for


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url, stable_seconds=0.2,
                 requeue_after_seconds=300)
    s.ensure_dirs()
    return s


def queued(settings: Settings, n: int) -> list[int]:
    with session_scope(settings.database_url) as session:
        return [repo.create_study(session, source_name=f"{i}.png", sha256=f"{i:064d}", size_bytes=1,
                                  stored_path=f"archive/{i}.png").id for i in range(n)]


def rows(settings: Settings) -> dict[int, Study]:
    with session_scope(settings.database_url) as session:
        return {s.id: s for s in session.scalars(select(Study).order_by(Study.id))}


class Groups:
    """A group enqueue callback that records each message's ids and what another session saw at call time."""

    def __init__(self, settings: Settings, fail: bool = False):
        self.settings, self.fail = settings, fail
        self.messages: list[list[int]] = []
        self.marked_at_call: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, ids: list[int]) -> None:
        with self.lock:
            if self.fail:
                raise ConnectionError("broker unreachable")
            found = rows(self.settings)
            self.marked_at_call += [i for i in ids if found[i].enqueued_at is not None]
            self.messages.append(list(ids))


def test_studies_committed_together_share_messages_and_are_marked_only_after_the_publish(settings):
    ids = queued(settings, 10)
    groups = Groups(settings)
    busy = [1]  # other files still being ingested: the sender lets groups fill
    sender = GroupSender(settings, groups, busy=lambda: busy[0], linger=2.0).start()
    try:
        for sid in ids:
            sender.submit(sid)
        busy[0] = 0
        sender.poke()
        wait_for(lambda: sum(map(len, groups.messages)) == 10, 20, message="all sent")
        wait_for(lambda: not sender.in_flight(), 20, message="all recorded")
    finally:
        sender.stop()
    assert sorted(i for m in groups.messages for i in m) == ids  # each study in exactly one message
    assert all(1 <= len(m) <= GROUP_MAX for m in groups.messages)
    assert len(groups.messages) == 3  # 4 + 4 + 2: one message per group, not one per study
    assert groups.marked_at_call == []  # enqueued_at was still NULL while each message went out
    assert all(r.enqueued_at is not None and r.enqueue_count == 1 for r in rows(settings).values())


def test_a_lone_film_is_sent_at_once(settings):
    [sid] = queued(settings, 1)
    groups = Groups(settings)
    sender = GroupSender(settings, groups, linger=5.0).start()  # nothing else being ingested: no lingering
    try:
        t0 = time.monotonic()
        sender.submit(sid)
        wait_for(lambda: groups.messages, 5, 0.005, message="sent")
        assert time.monotonic() - t0 < 1.0
    finally:
        sender.stop()
    assert groups.messages == [[sid]]


def test_a_failed_publish_leaves_the_studies_unmarked_for_the_sweep_which_skips_those_in_flight(settings):
    ids = queued(settings, 3)
    groups = Groups(settings, fail=True)
    sender = GroupSender(settings, groups).start()
    try:
        for sid in ids:
            sender.submit(sid)
        wait_for(lambda: not sender.in_flight(), 20, message="attempted")
    finally:
        sender.stop()
    assert groups.messages == []
    assert all(r.enqueued_at is None and r.status == Status.QUEUED for r in rows(settings).values())
    resent: list[int] = []
    # Studies still in the sender's hands are not sent a second time by the sweep; the others are, at once.
    assert requeue_stale(settings=settings, enqueue=resent.append, skip=lambda: {ids[0]}) == ids[1:]
    assert resent == ids[1:]
    assert requeue_stale(settings=settings, enqueue=resent.append) == [ids[0]]


def test_stop_sends_what_was_handed_over(settings):
    ids = queued(settings, 6)
    groups = Groups(settings)
    sender = GroupSender(settings, groups, busy=lambda: 1, linger=30.0).start()
    for sid in ids:
        sender.submit(sid)
    sender.stop()
    assert sorted(i for m in groups.messages for i in m) == ids
    assert all(r.enqueued_at is not None for r in rows(settings).values())


def test_a_burst_dropped_into_the_inbox_goes_out_in_fewer_messages_than_films(settings):
    films = fixture_images()
    groups = Groups(settings)
    singles: list[int] = []
    with Ingester(settings, singles.append, enqueue_group=groups):
        for i in range(12):
            # A trailing byte each: unique files, so none is a duplicate of another.
            (settings.inbox / f".f{i}.part").write_bytes(films[i % len(films)].read_bytes() + bytes([i]))
        for i in range(12):  # dropped together, as a modality's batch or a backlog arrives
            (settings.inbox / f".f{i}.part").rename(settings.inbox / f"film{i:02d}.jpeg")
        wait_for(lambda: len(rows(settings)) == 12 and all(r.enqueued_at for r in rows(settings).values()), 30,
                 message="12 studies sent and recorded")
    found = rows(settings)
    queued_ids = sorted(i for i, r in found.items() if r.status == Status.QUEUED)
    assert len(queued_ids) == 12
    assert sorted(i for m in groups.messages for i in m) == queued_ids and singles == []
    assert len(groups.messages) < len(queued_ids)
