"""The worklist over a seeded year-like mix (bench/scale.py's seeder), on SQLite and Postgres: the paged
lists equal an order computed independently in Python, the counts match, and the unread and read pages are
served by index ranges, not by sorting the table."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import event, select

from bench.scale import seed
from core import worklist as wl
from core.db import get_engine, session_scope
from core.models import Status, Study

MAX_WAIT = 60


def reference_unread(studies: list[Study], now: dt.datetime) -> list[set[int]]:
    """The documented unread order, computed from the studies alone (an oracle independent of worklist_rows)."""
    groups: dict[str, list[Study]] = {}
    for s in studies:
        if s.status == Status.SCORED and s.finding is None:
            key = f"{s.study_instance_uid}|{s.patient_id or ''}" if s.study_instance_uid else f"#{s.id}"
            groups.setdefault(key, []).append(s)
    cutoff = (now - dt.timedelta(minutes=MAX_WAIT)).replace(second=0, microsecond=0)

    def order(images):
        score, received = max(i.score for i in images), min(i.received_at for i in images)
        first = min(i.id for i in images)
        if any(i.flagged for i in images):
            return (0, -score, received, first)
        if received < cutoff:
            return (1, received, -score, first)
        return (2, -score, received, first)
    return [{i.id for i in g} for g in sorted(groups.values(), key=order)]


@pytest.fixture
def seeded(db_url):
    seed(db_url, 1500, seed_value=3)
    return db_url


def test_seeded_mix_pages_in_the_documented_order_with_matching_counts(seeded):
    now = dt.datetime.now(dt.timezone.utc)
    with session_scope(seeded) as s:
        studies = list(s.scalars(select(Study)))
        assert 1500 <= len(studies) <= 1502
        dicom = sum(1 for x in studies if x.study_instance_uid)
        assert 0.3 < dicom / len(studies) < 0.7  # 40% of studies are DICOM, with 1-3 images each
        expected = reference_unread(studies, now)
        paged, cursor = [], None
        while True:
            page = wl.section(s, "unread", max_wait_minutes=MAX_WAIT, now=now, limit=50, cursor=cursor)
            paged += [{i.id for i in e.images} for e in page.entries]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert paged == expected
        read_groups = {(x.study_instance_uid, x.patient_id) if x.study_instance_uid else x.id
                       for x in studies if x.status == Status.SCORED and x.finding is not None}
        strip = wl.status_strip(s, worker_alive_seconds=60, max_wait_minutes=MAX_WAIT, now=now)
        assert (strip.unread, strip.read) == (len(expected), len(read_groups))
        assert strip.failed == sum(1 for x in studies if x.status == Status.FAILED)
        overdue = sum(1 for g in expected if min(x.received_at for x in studies if x.id in g)
                      < now - dt.timedelta(minutes=MAX_WAIT))
        assert abs(strip.overdue - overdue) <= 1  # the page's cut-off is taken to the minute


def test_unread_and_read_pages_are_index_ranges_on_sqlite(tmp_path):
    from core.migrate import upgrade
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    upgrade(url)
    seed(url, 1500, seed_value=5)
    with session_scope(url) as s:
        statements = []
        engine = get_engine(url)

        def capture(conn, cursor, statement, parameters, context, executemany):
            if "FROM worklist_rows" in statement and "ORDER BY" in statement:
                statements.append((statement, parameters))
        event.listen(engine, "before_cursor_execute", capture)
        try:
            first = wl.section(s, "unread", max_wait_minutes=MAX_WAIT, limit=20)
            wl.section(s, "unread", max_wait_minutes=MAX_WAIT, limit=20, cursor=first.next_cursor)
            wl.section(s, "read", max_wait_minutes=MAX_WAIT, limit=20)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert statements
        for statement, parameters in statements:
            plan = " | ".join(row[-1] for row in s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + statement,
                                                                                  parameters))
            assert "INDEX ix_worklist_rows" in plan, plan
            if "received_at >= " not in statement:  # the routine tier sorts only the last hour's arrivals
                assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan
