"""The worklist over a seeded year-like mix (bench/scale.py's seeder), on SQLite and Postgres: the paged
lists equal an order computed independently in Python, the counts match, and the unread and read pages are
served by index ranges, not by sorting the table."""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event, select, text

from bench.scale import seed
from core import worklist as wl
from core.db import get_engine, session_scope
from core.models import Status, Study

MAX_WAIT = 60


@contextmanager
def captured(url: str, wanted: Callable[[str], bool]) -> Iterator[list[tuple[str, object]]]:
    """Collects (statement, parameters) of each statement the engine runs meanwhile that `wanted` accepts."""
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if wanted(statement):
            statements.append((statement, parameters))
    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", capture)


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
        with captured(url, lambda st: "FROM worklist_rows" in st and "ORDER BY" in st) as statements:
            first = wl.section(s, "unread", max_wait_minutes=MAX_WAIT, limit=20)
            wl.section(s, "unread", max_wait_minutes=MAX_WAIT, limit=20, cursor=first.next_cursor)
            wl.section(s, "read", max_wait_minutes=MAX_WAIT, limit=20)
        assert statements
        for statement, parameters in statements:
            plan = " | ".join(row[-1] for row in s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + statement,
                                                                                  parameters))
            assert "INDEX ix_worklist_rows" in plan, plan
            if "received_at >= " not in statement:  # the routine tier sorts only the last hour's arrivals
                assert "TEMP B-TREE" not in plan and "SCAN" not in plan, plan


def test_in_progress_pages_merge_queued_and_processing_in_arrival_order(seeded):
    """The in-progress section reads queued and processing studies with one index walk each and merges them:
    the pages together list every such study once, oldest first, and each statement is an index range."""
    with session_scope(seeded) as s:
        queued = list(s.scalars(select(Study).where(Study.status == Status.QUEUED).order_by(Study.id)))
        assert len(queued) >= 6
        for study in queued[::2]:  # every other one is being scored now
            study.status = Status.PROCESSING
        s.flush()
        expected = [x.id for x in sorted(queued, key=lambda x: (x.received_at, x.id))]
        paged, cursor = [], None
        with captured(seeded, lambda st: "FROM studies" in st and "ORDER BY studies.received_at" in st) as statements:
            while True:
                page = wl.section(s, "in_progress", max_wait_minutes=MAX_WAIT, limit=4, cursor=cursor)
                paged += [e.study.id for e in page.entries]
                assert page.total == len(queued)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        assert paged == expected
        assert statements and all(" IN " not in statement for statement, _ in statements)
        if s.get_bind().dialect.name == "postgresql":
            # Sorting priced out: a statement that needs one keeps its Sort node (a small table's plan may
            # sort anyway), one that an index walks in order loses it.
            s.execute(text("SET LOCAL enable_sort = off"))
            for statement, parameters in statements:
                plan = " | ".join(r[0] for r in s.connection().exec_driver_sql("EXPLAIN " + statement, parameters))
                assert "ix_studies_status_received" in plan and "Sort" not in plan, plan


def test_a_page_of_rows_loads_its_images_with_one_statement_text_on_postgres(seeded):
    """Pages of any length load their rows' images with the same statement (an array parameter on Postgres),
    which the server prepares and plans once; the images found are the same either way."""
    with session_scope(seeded) as s:
        members = lambda st: "FROM studies" in st and "study_instance_uid" in st.split("WHERE", 1)[-1]  # noqa: E731
        with captured(seeded, members) as statements:
            short = wl.section(s, "unread", max_wait_minutes=MAX_WAIT, limit=3)
            long = wl.section(s, "unread", max_wait_minutes=MAX_WAIT, limit=30)
        texts = [statement for statement, _ in statements]
        assert len(texts) == 2
        assert [{i.id for i in e.images} for e in long.entries[:3]] == [{i.id for i in e.images} for e in short.entries]
        assert sum(len(e.images) for e in long.entries) > len(long.entries)  # some rows are multi-image studies
        if s.get_bind().dialect.name == "postgresql":
            assert texts[0] == texts[1] and "ANY" in texts[0]
