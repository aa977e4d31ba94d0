"""The worklist as a reading tool, in headless Debian Chromium: focus kept across live updates and
arrivals announced, the keyboard reading flow, the film viewer, search and the safe threshold change.

Uses the server and browser fixtures of tests/test_browser.py (uvicorn serving the real app over real films).
"""
from __future__ import annotations

import datetime as dt

import pytest

from core import repository as repo
from core.db import session_scope
from core.models import utcnow
from tests.dicom_samples import ACCESSION
from tests.test_browser import browser, new_page, server, sign_in  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

ACTIVE_ROW = "() => { const r = document.activeElement.closest('tr'); return r && r.dataset.studyId; }"


def add_scored(site, name: str, score: float) -> int:
    """Adds a study scored just now (as a worker would save it) and returns its id."""
    with session_scope(site.settings.database_url) as s:
        new = repo.create_study(s, source_name=name, sha256=name.ljust(64, "0")[:64], size_bytes=1,
                                stored_path=f"archive/{name}", received_at=utcnow() - dt.timedelta(seconds=5))
        token = repo.claim_study(s, study_id=new.id, worker="test")
        repo.save_score(s, study_id=new.id, token=token, logit=-3.0, model_version="m", score=score,
                        threshold=site.threshold, calibration_version="split", width=10, height=10,
                        heatmap_path="heatmaps/none.png", timings={})
        return new.id


def polls(page) -> list[int]:
    """Counts the worklist polls the page makes (appended to as they answer)."""
    seen: list[int] = []
    page.on("response", lambda r: seen.append(r.status) if "/fragments/worklist" in r.url else None)
    return seen


def test_refresh_keeps_focus_and_announces_arrivals(server, browser):  # noqa: F811
    site, base, _ = server
    problems: list[str] = []
    page = new_page(browser, problems)
    sign_in(page, base, "dr.browser")
    answered = polls(page)
    page.keyboard.press("j")  # the keyboard selection lands on the first row, focused
    assert page.evaluate(ACTIVE_ROW) == str(site.flagged)
    assert page.locator(f'#body-unread tr[data-study-id="{site.flagged}"]').get_attribute("aria-selected") == "true"
    # Polls with nothing new leave the focus where it was.
    start = len(answered)
    for _ in range(100):
        if len(answered) >= start + 2:
            break
        page.wait_for_timeout(100)
    assert len(answered) >= start + 2 and page.evaluate(ACTIVE_ROW) == str(site.flagged)
    # Two refreshes that bring new studies: each is announced, and the focused row keeps the focus.
    for n, score in enumerate((0.051, 0.052), start=1):
        new = add_scored(site, f"late{n}.jpeg", score)
        page.wait_for_selector(f'#body-unread tr[data-study-id="{new}"]', timeout=15_000)
        assert page.evaluate(ACTIVE_ROW) == str(site.flagged), f"focus lost on refresh {n}"
        assert page.locator("#arrivals").inner_text().startswith("1 new study to read")
        assert page.locator("#arrivals").get_attribute("aria-live") == "polite"
    # Tab goes on to the next row, not into another section.
    page.keyboard.press("Tab")
    assert page.evaluate(ACTIVE_ROW) == page.locator("#body-unread tr").nth(1).get_attribute("data-study-id")
    assert problems == []


def test_keyboard_reading_flow_records_and_moves_to_the_next_unread(server, browser):  # noqa: F811
    site, base, dicom_id = server
    problems: list[str] = []
    page = new_page(browser, problems)
    sign_in(page, base, "dr.browser")
    page.keyboard.press("?")
    assert page.locator("#shortcuts").is_visible() and "next unread" in page.locator("#shortcuts").inner_text()
    page.keyboard.press("Escape")
    assert not page.locator("#shortcuts").is_visible()
    order = page.locator("#body-unread tr").evaluate_all("rows => rows.map(r => r.dataset.studyId)")
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("k")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/studies/{order[0]}")
    page.keyboard.press("Escape")
    page.wait_for_url(base + "/")
    # A click anywhere on a row opens its study.
    page.locator(f'#body-unread tr[data-study-id="{order[0]}"] td.score').click()
    page.wait_for_url(f"{base}/studies/{order[0]}")
    page.keyboard.press("p")  # pneumonia, then the next unread study in triage order
    page.wait_for_url(f"{base}/studies/{order[1]}?after={order[0]}")
    assert f"#{order[0]}" in page.locator("#after-note").inner_text()
    with session_scope(site.settings.database_url) as s:
        assert repo.get_study(s, study_id=int(order[0])).finding == "pneumonia"
        assert repo.get_study(s, study_id=int(order[0])).reviewer == "dr.browser"
    for i, study_id in enumerate(order[1:], start=1):
        page.keyboard.press("n")
        following = f"/studies/{order[i + 1]}?after={study_id}" if i + 1 < len(order) else f"/?after={study_id}"
        page.wait_for_url(base + following)
    assert "No unread studies are left" in page.locator("#after-note").inner_text()
    with session_scope(site.settings.database_url) as s:
        assert [repo.get_study(s, study_id=int(i)).finding for i in order[1:]] == ["normal"] * (len(order) - 1)
    # The overdue test study has no film in the archive: its page's images answer 404, and nothing else fails.
    absent = {f"404 {base}/studies/{site.overdue}/image", f"404 {base}/studies/{site.overdue}/heatmap.png"}
    assert [p for p in problems if p not in absent and "404" not in p] == []
    assert {p for p in problems if f"{base}/" in p} <= absent


def test_viewer_fits_zooms_pans_and_windows_the_film(server, browser):  # noqa: F811
    site, base, _ = server
    problems: list[str] = []
    page = new_page(browser, problems)
    page.set_viewport_size({"width": 1280, "height": 700})
    sign_in(page, base, "dr.browser", f"/studies/{site.flagged}")
    page.wait_for_function("() => ['film-image', 'heatmap-overlay'].map(id => document.getElementById(id))"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    page.wait_for_function("() => document.getElementById('viewer').dataset.scale")
    page.evaluate("() => document.getElementById('film-frame').scrollIntoView()")
    frame = page.locator("#film-frame").bounding_box()
    film = page.locator("#film-image").bounding_box()
    # Fit by default: the whole film is inside the frame, and the frame fits in the window.
    assert frame["height"] < 700 and frame["y"] >= 0 and frame["y"] + frame["height"] <= 700
    assert film["height"] <= frame["height"] + 1 and film["width"] <= frame["width"] + 1
    assert film["y"] >= frame["y"] - 1 and film["y"] + film["height"] <= frame["y"] + frame["height"] + 1

    def transform():
        return page.evaluate("() => new DOMMatrix(getComputedStyle(document.getElementById('film-stage')).transform)"
                             ".toJSON()")

    fitted = transform()
    page.click("#viewer [data-act=zoom-in]")
    zoomed = transform()
    assert zoomed["a"] == pytest.approx(fitted["a"] * 1.25, rel=1e-3)
    page.locator("#film-frame").hover()
    page.mouse.wheel(0, -300)
    page.wait_for_function(f"() => Number(document.getElementById('viewer').dataset.scale) > {zoomed['a'] + 1e-3}")
    wheeled = transform()
    # Drag pans by the distance dragged.
    x, y = frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 25, steps=4)
    page.mouse.up()
    panned = transform()
    assert (panned["e"] - wheeled["e"], panned["f"] - wheeled["f"]) == (pytest.approx(40, abs=0.5),
                                                                        pytest.approx(25, abs=0.5))
    page.keyboard.press("0")  # fit again
    assert transform()["a"] == pytest.approx(fitted["a"], rel=1e-3)
    page.keyboard.press("1")  # one film pixel per screen pixel
    assert transform()["a"] == pytest.approx(1.0, rel=1e-3)

    def slope():
        return float(page.locator("#wl-filter feFuncR").get_attribute("slope"))

    assert slope() == pytest.approx(1.0)
    page.select_option("#wl-preset", "lung")
    assert slope() == pytest.approx(1 / 0.7, rel=1e-3)
    page.keyboard.press("i")
    assert slope() == pytest.approx(-1 / 0.7, rel=1e-3)
    assert page.locator("#viewer-invert").get_attribute("aria-pressed") == "true"
    page.check("#wl-drag")  # dragging now sets window/level
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 100, y, steps=4)
    page.mouse.up()
    assert abs(slope()) < 1 / 0.7 and float(page.locator("#viewer").get_attribute("data-window")) > 0.7
    # The heat-map: H toggles it; the default is the reader's setting, kept across pages.
    assert page.locator("#heatmap-overlay").is_visible()
    page.keyboard.press("h")
    assert not page.locator("#heatmap-overlay").is_visible()
    page.uncheck("#heatmap-default")
    page.reload()
    page.wait_for_function("() => document.getElementById('viewer').dataset.scale")
    assert not page.locator("#heatmap-overlay").is_visible()
    page.keyboard.press("H")
    assert page.locator("#heatmap-overlay").is_visible()
    # The film is served at its full resolution (the viewer zooms into real pixels).
    natural = page.evaluate("() => [document.getElementById('film-image').naturalWidth, "
                            "document.getElementById('film-image').naturalHeight]")
    with session_scope(site.settings.database_url) as s:
        study = repo.get_study(s, study_id=site.flagged)
        assert natural == [study.width, study.height]
    assert problems == []


def test_search_by_accession_and_back_to_triage_order(server, browser):  # noqa: F811
    site, base, dicom_id = server
    problems: list[str] = []
    page = new_page(browser, problems)
    sign_in(page, base, "nurse.nina")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "search-q"
    page.keyboard.type(ACCESSION)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/?view=unread&q={ACCESSION}")
    assert page.locator("#body-search tr").evaluate_all("rows => rows.map(r => r.dataset.studyId)") == [str(dicom_id)]
    assert "not the triage order" in page.locator("#listing-note").inner_text()
    # A filter and a sort, then the clear way back.
    page.goto(base + "/?sort=oldest&flagged=1")
    assert page.locator("#body-unread tr").evaluate_all("rows => rows.map(r => r.dataset.studyId)") == [
        str(site.flagged)]
    page.click("#back-to-triage")
    page.wait_for_url(base + "/")
    assert page.locator("#body-failed").count() == 1 and page.locator("#listing-note").count() == 0
    assert problems == []
