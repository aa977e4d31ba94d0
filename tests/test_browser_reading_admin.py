"""The worklist as a reading tool, part two, in headless Debian Chromium: the threshold preview and
admin confirmations, the what-if number box and local times, the phone layout and other findings, and the
soft "being read by" mark seen by a second user. Fixtures: tests/test_browser.py.
"""
from __future__ import annotations

import datetime as dt

import pytest

from core import repository as repo
from core.db import session_scope
from tests.test_browser import browser, new_page, server, sign_in  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser


def test_threshold_preview_and_confirmations_in_chromium(server, browser):  # noqa: F811
    site, base, dicom_id = server
    problems: list[str] = []
    admin = new_page(browser, problems)
    sign_in(admin, base, "ada", "/admin/calibrations")
    assert admin.locator("#threshold").input_value() == f"{site.threshold:.4f}"  # rounded for people
    # Out of range: the server's message shows next to the field (no browser pop-up keeps the form back).
    admin.fill("#threshold", "1.5")
    admin.click("#threshold-preview")
    admin.wait_for_selector("#admin-error")
    assert "strictly between 0 and 1" in admin.locator("#admin-error").inner_text()
    assert admin.locator("#threshold").get_attribute("aria-invalid") == "true"
    problems.remove(f"422 {base}/admin/calibrations/threshold")
    problems.remove("Failed to load resource: the server responded with a status of 422 (Unprocessable Entity)")
    # Every unread film gets flagged at a threshold just above zero: the preview counts them before anything changes.
    with session_scope(site.settings.database_url) as s:
        unflagged = sum(1 for i in site.scored + [site.overdue, dicom_id]
                        if not repo.get_study(s, study_id=i).flagged)
    admin.fill("#threshold", "0.0001")
    admin.click("#threshold-preview")
    admin.wait_for_selector("#threshold-preview-panel")
    # The DICOM twin and its source film are one row each (different studies), so every unflagged row counts.
    assert admin.locator("#preview-newly-flagged").inner_text() == str(unflagged)
    assert admin.locator("#active-threshold").inner_text() == f"{site.threshold:.3f}"
    admin.click("#threshold-confirm")
    admin.wait_for_url(base + "/admin/calibrations")
    assert admin.locator("#active-threshold").inner_text() == "0.000"
    # Disabling a user asks first.
    admin.goto(base + "/admin/users")
    admin.click('tr[data-user="nurse.nina"] button[type=submit]')
    admin.wait_for_selector("#confirm-disable")
    assert "nurse.nina" in admin.locator("#confirm-disable").inner_text()
    assert "active" in admin.locator('tr[data-user="nurse.nina"]').inner_text()
    admin.click("#confirm-disable-button")
    admin.wait_for_url(base + "/admin/users")
    assert "disabled" in admin.locator('tr[data-user="nurse.nina"]').inner_text().lower()
    assert problems == []


def test_what_if_number_box_and_times_in_the_readers_zone(server, browser):  # noqa: F811
    site, base, _ = server
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Asia/Kolkata")
    page = context.new_page()
    page.on("pageerror", lambda e: problems.append(str(e)))
    sign_in(page, base, "dr.browser", f"/studies/{site.flagged}")
    with session_scope(site.settings.database_url) as s:
        study = repo.get_study(s, study_id=site.flagged)
        score, received = study.score, study.received_at
    # A threshold a hair above the score: shown with enough digits that "<" reads true.
    above = score + 2e-5
    page.fill("#whatif-number", f"{above:.6f}")
    decision = page.locator("#decision").inner_text()
    assert decision.startswith("What-if: Not flagged: score ")
    shown = decision.removeprefix("What-if: Not flagged: score ").split(" < threshold ")
    assert float(shown[0]) < float(shown[1]) and shown[0] != shown[1]
    assert float(page.locator("#whatif").input_value()) == pytest.approx(above, abs=1e-3)  # the slider follows
    page.fill("#whatif-number", "7")  # out of range: marked, the decision keeps the last valid threshold
    assert page.locator("#whatif-number").get_attribute("aria-invalid") == "true"
    assert page.locator("#decision").inner_text() == decision
    # Received time in the reader's zone (India, UTC+05:30, no daylight saving), with the zone named.
    local = (received.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))).strftime("%Y-%m-%d %H:%M:%S")
    shown_time = page.locator(".study-meta time.local-time").inner_text()
    assert shown_time.startswith(local) and ("GMT+5:30" in shown_time or "IST" in shown_time)
    context.close()
    assert problems == []


def test_phone_layout_and_other_findings(server, browser):  # noqa: F811
    site, base, _ = server
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    page.on("pageerror", lambda e: problems.append(str(e)))
    sign_in(page, base, "dr.browser")
    first = page.locator("#body-unread tr").first
    box = first.bounding_box()
    page.screenshot(path="/tmp/shots/phone_worklist.png", full_page=False)
    # Little chrome above it: the whole first row shows without scrolling, starting well within 450 px.
    assert box["y"] <= 330 and box["y"] + box["height"] <= 450, box
    assert page.evaluate("getComputedStyle(document.querySelector('#body-unread tr')).display") == "flex"  # a card
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390  # nothing wider than the phone
    assert page.locator(".caveat").is_visible() and "Not a diagnosis" in page.locator(".caveat").inner_text()
    assert "never replaces the radiologist" in page.locator("footer").inner_text()
    page.screenshot(path="/tmp/shots/phone_worklist.png", full_page=False)
    # The study page: the decision reads as a sentence, not one word per line.
    first.locator("td.study a").click()
    page.wait_for_url(f"{base}/studies/{site.flagged}")
    decision = page.locator("#decision").bounding_box()
    line = float(page.evaluate("parseFloat(getComputedStyle(document.getElementById('decision')).lineHeight)"))
    assert decision["width"] > 250 and decision["height"] <= 4 * line
    # Findings beyond the two labels are recorded (the study is read) without an outcome.
    page.check('input[name=finding][value="poor quality"]')
    page.click("form.feedback-form button[type=submit]:not([name])")
    page.wait_for_url(f"{base}/studies/{site.flagged}?saved=1#feedback")
    assert "poor quality" in page.locator("#recorded-finding").inner_text()
    assert page.locator("#outcome").count() == 0
    context.close()
    assert problems == []


def test_being_read_by_shows_to_a_second_user(server, browser):  # noqa: F811
    site, base, _ = server
    problems: list[str] = []
    nurse = new_page(browser, problems)
    sign_in(nurse, base, "nurse.nina")
    doctor = new_page(browser, problems)
    sign_in(doctor, base, "dr.browser", f"/studies/{site.flagged}")
    # The nurse's worklist shows the doctor's open study at its next update, without a reload.
    badge = f'#body-unread tr[data-study-id="{site.flagged}"] .badge-reading'
    nurse.wait_for_selector(badge, timeout=15_000)
    assert nurse.locator(badge).inner_text().startswith("Open by dr.browser for")
    nurse.click(f'#body-unread tr[data-study-id="{site.flagged}"] td.study a')
    nurse.wait_for_url(f"{base}/studies/{site.flagged}")
    assert "Also open by dr.browser" in nurse.locator("#readers").inner_text()
    # The doctor's open page learns of the nurse by itself, and can still record the finding.
    doctor.wait_for_function("() => document.getElementById('readers').textContent.includes('nurse.nina')",
                             timeout=15_000)
    doctor.keyboard.press("n")
    doctor.wait_for_url(f"**after={site.flagged}")
    with session_scope(site.settings.database_url) as s:
        assert repo.get_study(s, study_id=site.flagged).finding == "normal"
    absent = {f"404 {base}/studies/{site.overdue}/image", f"404 {base}/studies/{site.overdue}/heatmap.png"}
    assert [p for p in problems if p not in absent and "404 (Not Found)" not in p] == []
