"""Worklist ordering and sections against real migrated databases (SQLite and an isolated Postgres database)."""
from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import select, text

from core import calibrations
from core import repository as repo
from core import worklist as wl
from core.cursor import BadCursor
from core.db import session_scope
from core.models import Study, WorklistCount, WorklistRow

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
MAX_WAIT = 60  # minutes


def add_scored(session, name: str, *, score: float, minutes_ago: float, threshold: float = 0.5,
               logit: float = 0.0) -> int:
    """Creates a study received minutes_ago before NOW and scores it with the given calibrated score."""
    study = repo.create_study(session, source_name=name, sha256=uuid.uuid4().hex * 2, size_bytes=10,
                              stored_path=f"archive/{name}", received_at=NOW - dt.timedelta(minutes=minutes_ago))
    token = repo.claim_study(session, study_id=study.id, worker="w1")
    assert repo.save_score(session, study_id=study.id, token=token, logit=logit, model_version="m1", score=score,
                           threshold=threshold, calibration_version="c1", width=100, height=100,
                           heatmap_path=f"heatmaps/{study.id}.png", timings={})
    return study.id


def test_a_pass_stores_its_films_and_the_callers_objects_read_the_stored_values(db_url):
    with session_scope(db_url) as s:
        studies = [repo.create_study(s, source_name=f"pass-{i}", sha256=uuid.uuid4().hex * 2, size_bytes=10,
                                     stored_path=f"archive/pass-{i}") for i in range(3)]
        tokens = [repo.claim_study(s, study_id=st.id, worker="w1") for st in studies]
        results = [dict(study_id=st.id, token=tok, logit=0.5 * i, model_version="m1", score=0.3 * i, threshold=0.5,
                        calibration_version="c1", width=100 + i, height=90, heatmap_path=f"heatmaps/{st.id}.png",
                        timings={"batch_size": 3}) for i, (st, tok) in enumerate(zip(studies, tokens))]
        results[1]["token"] = "not-the-claim"  # a claim lost meanwhile (another worker took the study over)
        count = s.get(WorklistCount, "unread")
        before = count.rows
        assert repo.save_scores(s, results) == [studies[0].id, studies[2].id]
    assert count.rows == before + 2  # a count loaded in the session moves with the table
    # The session is closed: the objects hold what was stored, as an ORM update would have left them.
    assert [st.status for st in studies] == ["scored", "processing", "scored"]
    assert (studies[2].score, studies[2].flagged, studies[2].scored_flagged, studies[2].width) == (0.6, True, True, 102)
    assert studies[0].timings == {"batch_size": 3} and studies[0].heatmap_path == f"heatmaps/{studies[0].id}.png"
    with session_scope(db_url) as s:
        rows = {r.lead_id: r for r in s.scalars(select(WorklistRow))}
        assert set(rows) == {studies[0].id, studies[2].id}  # onto the worklist with one refresh for the pass
        assert rows[studies[2].id].flagged and rows[studies[2].id].neg_score == pytest.approx(-0.6)
        assert s.get(Study, studies[1].id).status == "processing"
        assert s.get(WorklistCount, "unread").rows == before + 2


def names(entries) -> list[str]:
    return [e.study.source_name for e in entries]


def test_unread_order_flagged_then_overdue_then_by_score(db_url):
    with session_scope(db_url) as s:
        add_scored(s, "low-fresh", score=0.10, minutes_ago=5)
        add_scored(s, "high-fresh", score=0.90, minutes_ago=5)
        add_scored(s, "mid-flag-old", score=0.60, minutes_ago=30)
        add_scored(s, "mid-flag-new", score=0.60, minutes_ago=10)  # same score: the older one first
        add_scored(s, "low-overdue-longest", score=0.05, minutes_ago=300)
        add_scored(s, "low-overdue", score=0.20, minutes_ago=90)
        add_scored(s, "flag-overdue", score=0.55, minutes_ago=120)
        add_scored(s, "mid-unflagged", score=0.45, minutes_ago=20)
        add_scored(s, "mid-unflagged-tie-new", score=0.45, minutes_ago=2)
    with session_scope(db_url) as s:
        entries = wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)
        assert names(entries) == [
            "high-fresh", "mid-flag-old", "mid-flag-new", "flag-overdue",  # flagged by score, ties oldest first
            "low-overdue-longest", "low-overdue",  # overdue unflagged: longest waiting first
            "mid-unflagged", "mid-unflagged-tie-new", "low-fresh",  # the rest by score, ties oldest first
        ]
        by_name = {e.study.source_name: e for e in entries}
        assert [e.tier for e in entries] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
        assert by_name["flag-overdue"].overdue and by_name["flag-overdue"].tier == wl.TIER_FLAGGED
        assert by_name["low-overdue"].overdue and not by_name["mid-unflagged"].overdue
        assert by_name["low-overdue-longest"].waiting_seconds == pytest.approx(300 * 60)
        assert by_name["high-fresh"].waiting_seconds == pytest.approx(5 * 60)


def test_overdue_limit_is_configurable_and_time_dependent(db_url):
    with session_scope(db_url) as s:
        add_scored(s, "low-old", score=0.1, minutes_ago=45)
        add_scored(s, "mid-new", score=0.4, minutes_ago=1)
    with session_scope(db_url) as s:
        assert names(wl.unread(s, max_wait_minutes=60, now=NOW)) == ["mid-new", "low-old"]
        assert names(wl.unread(s, max_wait_minutes=30, now=NOW)) == ["low-old", "mid-new"]
        later = NOW + dt.timedelta(minutes=20)  # low-old has now waited 65 minutes
        entries = wl.unread(s, max_wait_minutes=60, now=later)
        assert names(entries) == ["low-old", "mid-new"]
        assert [e.overdue for e in entries] == [True, False]


def test_sections_and_read_view(db_url):
    with session_scope(db_url) as s:
        read_id = add_scored(s, "read-me", score=0.8, minutes_ago=50)
        unread_id = add_scored(s, "unread", score=0.3, minutes_ago=40)
        q_old = repo.create_study(s, source_name="queued-old", sha256="a" * 64, size_bytes=1,
                                  stored_path="archive/qo", received_at=NOW - dt.timedelta(minutes=3)).id
        q_new = repo.create_study(s, source_name="queued-new", sha256="b" * 64, size_bytes=1,
                                  stored_path="archive/qn", received_at=NOW - dt.timedelta(minutes=1)).id
        assert repo.claim_study(s, study_id=q_new, worker="w1")
        bad = repo.create_study(s, source_name="bad.png", sha256="c" * 64, size_bytes=0, stored_path="archive/bad",
                                received_at=NOW - dt.timedelta(minutes=2)).id
        assert repo.mark_failed(s, study_id=bad, reason="empty file (0 bytes)", stored_path="quarantine/bad")
        dup = repo.create_study(s, source_name="copy.jpeg", sha256="a" * 64, size_bytes=1, stored_path="archive/qo",
                                received_at=NOW).id
        repo.record_feedback(s, study_id=read_id, finding="normal", comment="clear", reviewer="dr x")
    with session_scope(db_url) as s:
        sec = {n: wl.section(s, n, max_wait_minutes=MAX_WAIT, now=NOW) for n in wl.SECTIONS}
        assert [e.study.id for e in sec["unread"].entries] == [unread_id]
        assert [e.study.id for e in sec["in_progress"].entries] == [q_old, q_new]  # oldest first
        assert [e.study.status for e in sec["in_progress"].entries] == ["queued", "processing"]
        assert [(e.study.id, e.study.error) for e in sec["failed"].entries] == [(bad, "empty file (0 bytes)")]
        assert [(e.study.id, e.study.duplicate_of_id) for e in sec["duplicates"].entries] == [(dup, q_old)]
        read = sec["read"].entries
        assert [(e.study.id, e.study.finding, e.study.outcome) for e in read] == [(read_id, "normal", "FP")]
        assert not read[0].overdue and read[0].tier is None
        # Every study appears exactly once across the sections.
        everything = [e.study.id for e in wl.all_studies(s, max_wait_minutes=MAX_WAIT, now=NOW)]
        assert sorted(everything) == sorted(s.scalars(select(Study.id)))
        assert everything[0] == unread_id
        limited = wl.section(s, "in_progress", max_wait_minutes=MAX_WAIT, now=NOW, limit=1)
        assert len(limited.entries) == 1 and limited.total == 2
        with pytest.raises(ValueError):
            wl.section(s, "nope", max_wait_minutes=MAX_WAIT, now=NOW)


def test_status_strip_counts_workers_and_calibration(db_url):
    with session_scope(db_url) as s:
        add_scored(s, "old", score=0.12, minutes_ago=120, logit=-2.0)
        add_scored(s, "new", score=0.88, minutes_ago=1, logit=2.0)
        q = repo.create_study(s, source_name="q", sha256="d" * 64, size_bytes=1, stored_path="archive/q").id
        repo.create_study(s, source_name="q2", sha256="e" * 64, size_bytes=1, stored_path="archive/q2")
        assert repo.claim_study(s, study_id=q, worker="w1")
        calibrations.register(s, version="cal-7", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=0.42, source="test", actor="test")
        calibrations.activate(s, version="cal-7", actor="test")
    with session_scope(db_url) as s:
        strip = wl.status_strip(s, worker_alive_seconds=60, max_wait_minutes=MAX_WAIT, now=NOW)
        assert (strip.queued, strip.processing, strip.queue_length) == (1, 1, 2)
        assert (strip.unread, strip.overdue, strip.failed, strip.read) == (2, 1, 0, 0)
        assert strip.workers_alive == 0 and strip.model_versions == []
        assert (strip.calibration_version, strip.calibration_model_version, strip.threshold) == ("cal-7", "m1", 0.42)
        assert names(wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)) == ["new", "old"]  # new is flagged
        repo.heartbeat(s, name="worker-a", model_version="m1", device="cpu")
        repo.heartbeat(s, name="worker-b", model_version="m1", device="cpu")
        # A new calibration re-derives the displayed flags from the stored logits; the order follows.
        calibrations.register(s, version="cal-strict", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=0.95, source="test", actor="test")
        calibrations.activate(s, version="cal-strict", actor="test")
    with session_scope(db_url) as s:
        strip = wl.status_strip(s, worker_alive_seconds=60, max_wait_minutes=MAX_WAIT)
        assert strip.workers_alive == 2 and strip.model_versions == ["m1"]
        assert strip.calibration_version == "cal-strict"
        entries = wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)
        # 0.88 < 0.95: nothing is flagged now, so the overdue film rises above the higher score.
        assert names(entries) == ["old", "new"]
        assert [(e.tier, e.overdue, e.study.flagged) for e in entries] == [(1, True, False), (2, False, False)]
        assert entries[1].study.score == pytest.approx(0.8807970779778823)


# --- paging at scale and grouping by patient --------------------------------------------------------------


def add_dicom(session, name: str, *, uid: str, patient: str, score: float, minutes_ago: float) -> int:
    """Creates and scores one DICOM image of study `uid` for `patient`."""
    study = repo.create_study(session, source_name=name, sha256=uuid.uuid4().hex * 2, size_bytes=10,
                              stored_path=f"archive/{name}", received_at=NOW - dt.timedelta(minutes=minutes_ago),
                              identity={"study_instance_uid": uid, "patient_id": patient,
                                        "sop_instance_uid": f"{uid}.{uuid.uuid4().int % 10**9}"})
    token = repo.claim_study(session, study_id=study.id, worker="w1")
    assert repo.save_score(session, study_id=study.id, token=token, logit=0.0, model_version="m1", score=score,
                           threshold=0.5, calibration_version="c1", width=1, height=1, heatmap_path="h", timings={})
    return study.id


def page_through(session, name: str, *, limit: int, between=None) -> list[int]:
    """Lists a section page by page by its cursors, calling between() after each page; returns lead ids."""
    seen, cursor = [], None
    while True:
        page = wl.section(session, name, max_wait_minutes=MAX_WAIT, now=NOW, limit=limit, cursor=cursor)
        assert len(page.entries) <= limit and page.offset == len(seen)
        seen += [e.study.id for e in page.entries]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
        if between is not None:
            between()


def test_paging_is_complete_and_stable_while_studies_arrive(db_url):
    import random
    rng = random.Random(4)
    with session_scope(db_url) as s:
        for i in range(40):  # every tier, equal scores and arrival times, and DICOM rows of 1-3 images
            if i % 4 == 0:
                for j in range(1 + i % 3):
                    add_dicom(s, f"d{i}-{j}", uid=f"1.2.3.{i}", patient=f"P{i}", score=round(rng.random(), 1),
                              minutes_ago=rng.choice([5, 90, 200]))
            else:
                add_scored(s, f"f{i}", score=round(rng.random(), 1), minutes_ago=rng.choice([5, 30, 90, 200]))
        for i in range(9):
            sid = add_scored(s, f"r{i}", score=0.3, minutes_ago=100 + i)
            repo.record_feedback(s, study_id=sid, finding="normal", comment=None, reviewer="dr")
    with session_scope(db_url) as s:
        expected_unread = [e.study.id for e in wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)]
        expected_read = [e.study.id for e in wl.section(s, "read", max_wait_minutes=MAX_WAIT, now=NOW).entries]
        assert len(expected_unread) == 40 and len(set(expected_unread)) == 40  # 10 DICOM rows, 30 films
        arrivals = iter(range(1000))

        def arrive():  # new films of every kind land while the reader pages: top, overdue and routine
            with session_scope(db_url) as w:
                n = next(arrivals)
                add_scored(w, f"new{n}", score=0.99, minutes_ago=1)
                add_scored(w, f"new-old{n}", score=0.01, minutes_ago=500)
                add_dicom(w, f"new-d{n}", uid=f"9.9.{n}", patient="Q", score=0.2, minutes_ago=2)
                sid = add_scored(w, f"new-read{n}", score=0.4, minutes_ago=3)
                repo.record_feedback(w, study_id=sid, finding="pneumonia", comment=None, reviewer="dr")
            s.expire_all()

        paged = page_through(s, "unread", limit=4, between=arrive)
        # Each study that was there at the start appears exactly once, in the order it had; none repeats.
        assert len(paged) == len(set(paged))
        assert [i for i in paged if i in set(expected_unread)] == expected_unread
        paged_read = page_through(s, "read", limit=2, between=arrive)
        assert len(paged_read) == len(set(paged_read)) and set(expected_read) <= set(paged_read)
        # With nothing arriving, the pages are exactly the whole list.
        assert page_through(s, "read", limit=3) == [e.study.id for e in wl.section(
            s, "read", max_wait_minutes=MAX_WAIT, now=NOW).entries]


def test_worklist_rows_and_counts_match_a_regrouping_after_every_kind_of_write(db_url):
    with session_scope(db_url) as s:
        a1 = add_dicom(s, "a1", uid="1.5.1", patient="A", score=0.3, minutes_ago=10)
        a2 = add_dicom(s, "a2", uid="1.5.1", patient="A", score=0.8, minutes_ago=20)
        add_scored(s, "film", score=0.1, minutes_ago=120)
    with session_scope(db_url) as s:
        rows = wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)
        assert [(e.study.id, sorted(i.id for i in e.images), e.flagged) for e in rows][0] == (a2, [a1, a2], True)
        strip = wl.status_strip(s, worker_alive_seconds=60, max_wait_minutes=MAX_WAIT, now=NOW)
        assert (strip.unread, strip.overdue, strip.read) == (2, 1, 0)
        repo.record_study_feedback(s, study_id=a1, finding="pneumonia", comment=None, reviewer="dr")
    with session_scope(db_url) as s:
        strip = wl.status_strip(s, worker_alive_seconds=60, max_wait_minutes=MAX_WAIT, now=NOW)
        assert (strip.unread, strip.overdue, strip.read) == (1, 1, 1)
        calibrations.register(s, version="strict", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=0.99, source="test", actor="test")
        calibrations.activate(s, version="strict", actor="test")  # logit 0 → score 0.5 everywhere
    with session_scope(db_url) as s:
        stored = {(r.section, r.group_key): (r.lead_id, r.neg_score, r.flagged, r.images)
                  for r in s.scalars(select(WorklistRow))}
        assert stored == {("read", "1.5.1|A"): (a1, -0.5, False, 2), ("unread", f"#{a2 + 1}"): (a2 + 1, -0.5, False, 1)}
        assert wl.section_totals(s)["read"] == 1 and wl.section_totals(s)["unread"] == 1


def test_two_patients_sharing_a_study_uid_are_two_rows_and_a_finding_stays_on_one(db_url):
    with session_scope(db_url) as s:
        ann = add_dicom(s, "ann.dcm", uid="1.2.840.99", patient="ANN", score=0.9, minutes_ago=5)
        bob = add_dicom(s, "bob.dcm", uid="1.2.840.99", patient="BOB", score=0.2, minutes_ago=5)
    with session_scope(db_url) as s:
        rows = wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)
        assert [[i.id for i in e.images] for e in rows] == [[ann], [bob]]
        assert [i.id for i in repo.group_images(s, study_id=bob)] == [bob]
        marked = repo.record_study_feedback(s, study_id=ann, finding="pneumonia", comment=None, reviewer="dr")
        assert [m.id for m in marked] == [ann]
    with session_scope(db_url) as s:
        assert repo.get_study(s, study_id=bob).finding is None
        assert [e.study.id for e in wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)] == [bob]
        assert wl.row_for(s, study_id=bob, max_wait_minutes=MAX_WAIT).images == (repo.get_study(s, study_id=bob),)


def test_a_cursor_that_was_not_made_here_is_refused_with_a_reason(db_url):
    with session_scope(db_url) as s:
        for i in range(3):
            add_scored(s, f"f{i}", score=0.1 * i, minutes_ago=5)
        good = wl.section(s, "unread", max_wait_minutes=MAX_WAIT, now=NOW, limit=1).next_cursor
        for bad in ("x", good[:-6], good[::-1], "eyJzIjoidW5yZWFkIn0"):
            with pytest.raises(BadCursor, match="cursor"):
                wl.section(s, "unread", max_wait_minutes=MAX_WAIT, now=NOW, limit=1, cursor=bad)
        with pytest.raises(BadCursor, match="pages the 'unread' list"):
            wl.section(s, "read", max_wait_minutes=MAX_WAIT, now=NOW, limit=1, cursor=good)


def test_migration_0005_backfills_rows_of_existing_studies(tmp_path):
    from alembic import command
    from core.migrate import alembic_config
    from core.db import get_engine
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0004")
    with get_engine(url).begin() as c:
        for i, (uid, patient, finding) in enumerate([("1.9", "A", None), ("1.9", "A", None), ("1.9", "B", "normal"),
                                                     (None, None, None)], start=1):
            c.execute(text("INSERT INTO studies (id, source_name, sha256, size_bytes, stored_path, status, "
                           "received_at, enqueue_count, claim_count, score, flagged, finding, feedback_at, "
                           "study_instance_uid, patient_id) VALUES (:i, 'f', 's', 1, 'p', 'scored', "
                           "'2026-01-01 10:00:00.000000', 1, 0, :score, 0, :f, :fa, :uid, :p)"),
                      {"i": i, "score": i / 10, "f": finding, "fa": "2026-01-02 10:00:00.000000" if finding else None,
                       "uid": uid, "p": patient})
    get_engine(url).dispose()
    command.upgrade(alembic_config(url), "head")
    with session_scope(url) as s:
        rows = {(r.section, r.group_key): (r.lead_id, r.images) for r in s.scalars(select(WorklistRow))}
        assert rows == {("unread", "1.9|A"): (2, 2), ("read", "1.9|B"): (3, 1), ("unread", "#4"): (4, 1)}
        assert wl.section_totals(s)["unread"] == 2 and wl.section_totals(s)["read"] == 1
        assert [e.study.id for e in wl.unread(s, max_wait_minutes=MAX_WAIT, now=NOW)] == [4, 2]
