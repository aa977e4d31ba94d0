"""The polled worklist fragment answered 304 from the worklist's state alone (web.poll, core.worklist_version).

On SQLite and Postgres: the change counter's triggers move it with every committed write, once per transaction
on Postgres and never before the commit; the state moves with each time-driven fact a page shows. Through the
app: an idle poll builds no page, and each kind of change still reaches the poller.
"""
from __future__ import annotations

import datetime as dt
import re
import time

from fastapi.testclient import TestClient
from sqlalchemy import delete, update

from core import auth, calibrations, reading, worklist_rows
from core import repository as repo
from core.db import session_scope
from core.models import Study, WorkerHeartbeat, WorklistRow, utcnow
from core.worklist_version import data_version, worklist_state
from tests.test_web import (add_user, client, post_json, row_html, sign_in, site,  # noqa: F401 (fixtures)
                            site_template)
from web import poll
from web.app import create_app

WAIT, ALIVE, EXPIRE = 60, 30, 90


def scored_study(s, name: str, received_at: dt.datetime) -> int:
    """An unread, scored study (and its worklist row)."""
    study = repo.create_study(s, source_name=name, sha256=name.ljust(64, "0")[:64], size_bytes=1,
                              stored_path=f"archive/{name}", received_at=received_at)
    token = repo.claim_study(s, study_id=study.id, worker="test")
    assert repo.save_score(s, study_id=study.id, token=token, logit=-2.0, model_version="m", score=0.12,
                           threshold=0.5, calibration_version="c", width=10, height=10,
                           heatmap_path="heatmaps/none.png", timings={})
    return study.id


def test_every_committed_write_to_studies_or_rows_moves_the_version(db_url):
    postgres = db_url.startswith("postgresql")
    with session_scope(db_url) as s:
        before = data_version(s)
    with session_scope(db_url) as s:  # one transaction: three studies, their claims, scores and rows
        ids = [scored_study(s, f"v{i}.jpeg", utcnow()) for i in range(3)]
    with session_scope(db_url) as s:
        after = data_version(s)
    assert after == before + 1 if postgres else after > before  # Postgres: once per transaction, at commit

    # Not before the commit: another session still reads the old number while a write is pending.
    with session_scope(db_url) as writer:
        writer.execute(update(Study).where(Study.id == ids[0]).values(error="note"))
        writer.flush()
        with session_scope(db_url) as other:
            assert data_version(other) == after
    with session_scope(db_url) as s:
        assert data_version(s) > after
        moved = data_version(s)
    with session_scope(db_url) as s:  # a worklist row alone, and a delete
        s.execute(delete(WorklistRow).where(WorklistRow.lead_id == ids[1]))
    with session_scope(db_url) as s:
        assert data_version(s) > moved
        moved = data_version(s)
    with session_scope(db_url) as s:  # a rolled-back write moves nothing
        s.execute(update(Study).where(Study.id == ids[2]).values(error="gone"))
        s.rollback()
    with session_scope(db_url) as s:
        assert data_version(s) == moved


def test_the_state_moves_with_each_time_driven_fact_and_only_for_those_who_see_it(db_url):
    now = utcnow().replace(microsecond=0)
    received = now - dt.timedelta(minutes=WAIT) + dt.timedelta(seconds=20)  # overdue in 20 s
    with session_scope(db_url) as s:
        study = scored_study(s, "t.jpeg", received)
        doctor = auth.create_user(s, name="dora", role="doctor", password="x" * 12, actor="test").id
        nurse = auth.create_user(s, name="nils", role="nurse", password="x" * 12, actor="test").id

    def state(at, viewer=nurse):
        with session_scope(db_url) as s:
            return worklist_state(s, now=at, max_wait_minutes=WAIT, worker_alive_seconds=ALIVE,
                                  reading_expire_seconds=EXPIRE, viewer_id=viewer)

    quiet = state(now)
    assert state(now) == quiet and state(now + dt.timedelta(seconds=5)) == quiet  # time alone, nothing crossed
    assert state(now + dt.timedelta(seconds=21)) != quiet  # the row is now past the wait limit

    with session_scope(db_url) as s:  # someone opens the study: others see it, the reader does not
        reading.mark_open(s, study_id=study, user_id=doctor, user_name="dora", expire_seconds=EXPIRE, now=now)
    opened = state(now)
    assert opened != quiet and state(now, viewer=doctor)[2] == quiet[2]
    assert state(now + dt.timedelta(seconds=EXPIRE + 1))[2] == quiet[2]  # the mark expired

    with session_scope(db_url) as s:  # a worker beats, then falls silent
        repo.heartbeat(s, name="w1", model_version="m", device="cpu")
    beating = state(utcnow())
    assert beating[3] == (("w1", "m"),)
    assert state(utcnow() + dt.timedelta(seconds=ALIVE + 1))[3] == ()

    with session_scope(db_url) as s:  # a calibration is put in force
        calibrations.register(s, version="local-1", model_version="m", kind="temperature",
                              params={"temperature": 1.2}, threshold=0.4, source="test", actor="test")
        before = data_version(s)
    assert state(now)[4] == ()
    with session_scope(db_url) as s:
        calibrations.activate(s, version="local-1", actor="test")
    calibrated = state(now)
    assert calibrated[4][:1] == ("local-1",) and calibrated[0] > before  # activation rescored the rows too


def test_version_tag_ignores_the_clock_and_ticking_labels_only():
    page = (b'<time datetime="2026-01-01T10:00:00+00:00">10:00:00</time><tr><td>'
            b'<time class="tick" data-tick="waited" datetime="2026-01-01T09:00:00+00:00">1 h 00 min</time></td>'
            b'<td>0.120</td></tr>')
    later = page.replace(b">10:00:00<", b">10:05:00<").replace(b"1 h 00 min", b"1 h 05 min")
    assert poll.version_tag(page) == poll.version_tag(later)
    assert poll.version_tag(page) != poll.version_tag(page.replace(b"0.120", b"0.130"))


def test_an_idle_poll_builds_no_page_and_every_change_still_arrives(client, site, monkeypatch):  # noqa: F811
    first = client.get("/fragments/worklist")
    etag = first.headers["etag"]
    cell = re.search(r'<td class="waiting" data-label="Waiting"><time class="tick" data-tick="waited" '
                     r'datetime="([^"]+)">', row_html(first.text, site.overdue))
    with session_scope(site.settings.database_url) as s:
        received = repo.get_study(s, study_id=site.overdue).received_at
    assert abs((dt.datetime.fromisoformat(cell.group(1)) - received).total_seconds()) <= 0.5

    import web.pages

    def no_page(*args, **kwargs):
        raise AssertionError("an unchanged worklist was built")

    with monkeypatch.context() as m:
        m.setattr(web.pages, "worklist_context", no_page)
        for _ in range(3):
            idle = client.get("/fragments/worklist", headers={"If-None-Match": etag})
            assert idle.status_code == 304 and idle.content == b"" and idle.headers["etag"] == etag

    # Another user opens a study: the poll that had the old version gets the mark.
    add_user(site.settings, "nina", "nurse")
    with TestClient(create_app(site.settings)) as nurse:
        sign_in(nurse, "nina")
        assert nurse.get(f"/studies/{site.flagged}").status_code == 200
    marked = client.get("/fragments/worklist", headers={"If-None-Match": etag})
    assert marked.status_code == 200 and "Open by nina for" in re.sub(r"<[^>]+>", "",
                                                                         row_html(marked.text, site.flagged))
    etag = marked.headers["etag"]
    assert client.get("/fragments/worklist", headers={"If-None-Match": etag}).status_code == 304

    # A finding is recorded: the row leaves the unread list.
    assert post_json(client, f"/api/studies/{site.flagged}/feedback", {"finding": "pneumonia"}).status_code == 200
    changed = client.get("/fragments/worklist", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert f'data-study-id="{site.flagged}"' not in changed.text.split('id="body-unread"')[1].split("</tbody>")[0]


def test_a_row_reaching_the_wait_limit_is_not_hidden_by_a_304(client, site):  # noqa: F811
    # No data changes while the row crosses the limit: only the clock moves it.
    study = site.scored[-1]
    with session_scope(site.settings.database_url) as s:
        crossing = utcnow() - dt.timedelta(minutes=site.settings.max_wait_minutes) + dt.timedelta(seconds=2)
        s.execute(update(Study).where(Study.id == study).values(received_at=crossing))
        worklist_rows.rebuild(s)
    before = client.get("/fragments/worklist")
    assert "OVERDUE" not in row_html(before.text, study)
    time.sleep(max(0.0, (crossing + dt.timedelta(minutes=site.settings.max_wait_minutes)
                         - utcnow()).total_seconds()) + 0.3)
    after = client.get("/fragments/worklist", headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200 and "OVERDUE" in row_html(after.text, study)


def test_a_worker_falling_silent_reaches_the_poller(client, site):  # noqa: F811
    with session_scope(site.settings.database_url) as s:
        repo.heartbeat(s, name="w-test", model_version="m", device="cpu")
    first = client.get("/fragments/worklist")
    assert re.search(r"Workers alive</dt>\s*<dd><strong>1<", first.text)
    with session_scope(site.settings.database_url) as s:  # heartbeats are not worklist data: no version moves
        s.execute(update(WorkerHeartbeat).values(
            last_seen=utcnow() - dt.timedelta(seconds=site.settings.worker_alive_seconds + 1)))
    again = client.get("/fragments/worklist", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 200 and "none: new films are not being scored" in again.text
