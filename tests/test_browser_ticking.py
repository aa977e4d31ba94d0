"""In Chromium: waiting times tick in the page while the poll answers 304, in the same words as the server's.

Uses the server and browser fixtures of tests/test_browser.py (uvicorn serving the real app over real films).
"""
from __future__ import annotations

import datetime as dt
import re

from core import repository as repo
from core.db import session_scope
from core.models import utcnow
from tests.test_browser import browser, new_page, server, sign_in  # noqa: F401 (fixtures)
from web.templating import waited


def test_waiting_times_tick_in_the_page_while_the_poll_answers_304(server, browser):  # noqa: F811
    site, base, _ = server
    with session_scope(site.settings.database_url) as s:
        new = repo.create_study(s, source_name="fresh.jpeg", sha256="e" * 64, size_bytes=1,
                                stored_path="archive/fresh.jpeg", received_at=utcnow() - dt.timedelta(seconds=5))
        token = repo.claim_study(s, study_id=new.id, worker="test")
        repo.save_score(s, study_id=new.id, token=token, logit=-3.0, model_version="m", score=0.047,
                        threshold=site.threshold, calibration_version="split", width=10, height=10,
                        heatmap_path="heatmaps/none.png", timings={})
    problems: list[str] = []
    page = new_page(browser, problems)
    polls: list[int] = []
    page.on("response", lambda r: polls.append(r.status) if "/fragments/worklist" in r.url else None)
    sign_in(page, base, "dr.browser")
    label = page.locator(f'#body-unread tr[data-study-id="{new.id}"] td.waiting time.tick')

    def seconds() -> int:
        return int(re.fullmatch(r"(\d+) s", label.inner_text()).group(1))

    first = seconds()
    # The page ticks once a second and polls every second (the fixture's refresh_seconds). A tick can fall
    # just before a second's boundary, so a fixed wait may see one second fewer: wait until the label has
    # moved three seconds on, with room for a loaded machine.
    page.wait_for_function("""([selector, target]) => {
        const label = document.querySelector(selector);
        return label !== null && parseInt(label.textContent, 10) >= target; }""",
                           arg=[f'#body-unread tr[data-study-id="{new.id}"] td.waiting time.tick', first + 3],
                           timeout=15_000)
    assert seconds() >= first + 3
    for _ in range(40):  # the poll's answers reach Python while it waits on the page
        if polls.count(304) >= 2:
            break
        page.wait_for_timeout(250)
    assert polls.count(304) >= 2, polls  # the labels moved with no new fragment

    # The page's words are the server's, for every range `waited` has.
    for span in (45.5, 12 * 60 + 30, 3 * 3600 + 5 * 60 + 30, 52 * 3600 + 30):  # mid-unit: a clock skew
        # of a fraction of a second between the page and the server cannot change the words
        since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=span)).isoformat()
        shown = page.evaluate("""since => {
            const t = document.createElement("time");
            t.className = "tick"; t.setAttribute("data-tick", "waited"); t.setAttribute("datetime", since);
            document.body.appendChild(t); window.ChestAidTick(document); return t.textContent; }""", since)
        assert shown == waited(span), (span, shown)
    opened = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=4, seconds=30)).isoformat()
    assert page.evaluate("""since => {
        const t = document.createElement("time");
        t.className = "tick"; t.setAttribute("data-tick", "open"); t.setAttribute("datetime", since);
        document.body.appendChild(t); window.ChestAidTick(document); return t.textContent; }""", opened) == "4 min"
    assert not problems, problems
