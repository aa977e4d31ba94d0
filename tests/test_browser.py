"""Real browser sessions: headless Debian Chromium driven by Playwright against uvicorn serving the app.

A doctor signs in through the login page and records a finding; a nurse sees it read-only; an admin
changes the threshold on the calibration page.
"""
from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from core import repository as repo
from core.db import get_engine, session_scope
from core.intake.ingest import ingest_file
from core.ml.bundle import load_bundle
from core.models import utcnow
from core.pipeline import process_studies
from tests.conftest import REQUIRE_SERVICES, make_bundle
from tests.dicom_samples import ACCESSION, PATIENT_ID, film, make_dataset, to_bytes
from tests.test_web import PASSWORD, add_user, build_site
from web import sessions
from web.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path("/tmp/shots")

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """Serves create_app(settings) with uvicorn in a thread, over a site with two scored films and a scored
    DICOM film (yielded as its study id)."""
    if not CHROMIUM.exists() and not REQUIRE_SERVICES:
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium")
    # Seed 1: a random bundle whose Grad-CAMs are not all zero, so the overlay has something to show.
    bundle_dir = make_bundle(tmp_path / "bundle", seed=1)
    site = build_site(tmp_path / "site", bundle_dir, n_films=2)
    # A DICOM twin of the lowest-scoring film (same pixels, so unflagged), through the real ingest and pipeline.
    dicom = make_dataset(film(site.sources[site.scored[-1]]), WindowCenter=128, WindowWidth=256)
    (site.settings.inbox / "scan.dcm").write_bytes(to_bytes(dicom))
    enqueued: list[int] = []
    dicom_id = ingest_file(site.settings.inbox / "scan.dcm", settings=site.settings, enqueue=enqueued.append,
                           wait=False)
    assert process_studies(enqueued, bundle=load_bundle(bundle_dir, device="cpu"), settings=site.settings,
                           worker="test") == {dicom_id: "scored"}
    site.settings.refresh_seconds = 1
    for name, role in (("dr.browser", "doctor"), ("nurse.nina", "nurse"), ("ada", "admin")):
        add_user(site.settings, name, role)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(site.settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield site, f"http://127.0.0.1:{port}", dicom_id
    server.should_exit = True
    thread.join(timeout=10)
    get_engine(site.settings.database_url).dispose()


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRE_SERVICES:
            pytest.fail("playwright is not installed")
        pytest.skip("playwright is not installed")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def new_page(browser, problems: list[str]):
    """Opens a page in its own context (its own cookies: one person), recording errors and refusals."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return page


def sign_in(page, base: str, name: str, url: str = "/") -> None:
    """Opens a page, is sent to the sign-in page, signs in, and lands on the page asked for."""
    page.goto(base + url)
    page.wait_for_url(f"{base}/login**")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    page.click("form.login-form button[type=submit]")
    page.wait_for_url(base + url)
    assert page.locator("#whoami-name").inner_text() == name


def test_worklist_study_sliders_and_feedback_in_chromium(server, browser, monkeypatch):
    site, base, dicom_id = server
    problems: list[str] = []
    page = new_page(browser, problems)
    SHOTS.mkdir(parents=True, exist_ok=True)

    # Nobody gets in without signing in; the sign-in page says nothing about who exists.
    page.goto(base + "/")
    page.wait_for_url(f"{base}/login")
    page.fill("#name", "dr.browser")
    page.fill("#password", "not the password")
    page.click("form.login-form button[type=submit]")
    assert "Sign-in failed" in page.locator("#login-error").inner_text()
    problems.remove(f"401 {base}/login")  # the refused sign-in itself
    page.screenshot(path=str(SHOTS / "login.png"), full_page=True)
    page.fill("#password", PASSWORD)
    page.click("form.login-form button[type=submit]")
    page.wait_for_url(base + "/")
    assert page.locator("#whoami-role").inner_text().lower() == "doctor"

    # Worklist: flagged study first, marked in words.
    rows = page.locator("#body-unread tr")
    assert rows.first.get_attribute("data-study-id") == str(site.flagged)
    assert "FLAGGED ≥" in rows.first.inner_text()
    assert page.locator(".caveat").is_visible()
    # A DICOM study's row shows its accession number and patient ID; the patient's name is on its page only.
    dicom_row = page.locator(f'#body-unread tr[data-study-id="{dicom_id}"]')
    assert dicom_row.locator("td.accession").inner_text() == ACCESSION
    assert dicom_row.locator("td.patient-id").inner_text() == PATIENT_ID
    assert "routine" in dicom_row.inner_text() and "Testperson" not in page.locator("main").inner_text()

    # Auto-refresh swaps rows in place: a newly scored study appears without a reload or a scroll jump.
    page.evaluate("window.__marker = 'same page'")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    scroll_before = page.evaluate("window.scrollY")
    with session_scope(site.settings.database_url) as s:
        new = repo.create_study(s, source_name="late.jpeg", sha256="f" * 64, size_bytes=1,
                                stored_path="archive/late.jpeg", received_at=utcnow() - dt.timedelta(seconds=5))
        token = repo.claim_study(s, study_id=new.id, worker="test")
        repo.save_score(s, study_id=new.id, token=token, logit=-3.0, model_version="m", score=0.047,
                        threshold=site.threshold, calibration_version="split", width=10, height=10,
                        heatmap_path="heatmaps/none.png", timings={})
    page.wait_for_selector(f'#body-unread tr[data-study-id="{new.id}"]', timeout=15_000)
    assert page.evaluate("window.__marker") == "same page"
    assert scroll_before > 0 and page.evaluate("window.scrollY") == scroll_before
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / "worklist.png"), full_page=True)

    # Study page: film and overlay loaded, alpha slider changes the overlay's opacity.
    page.click(f'#body-unread tr[data-study-id="{site.flagged}"] a')
    page.wait_for_url(f"{base}/studies/{site.flagged}")
    page.wait_for_function("() => ['film-image', 'heatmap-overlay'].map(id => document.getElementById(id))"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    overlay_opacity = "() => getComputedStyle(document.getElementById('heatmap-overlay')).opacity"
    assert page.evaluate(overlay_opacity) == "0.5"
    page.locator("#alpha").fill("85")
    assert page.evaluate(overlay_opacity) == "0.85"
    assert page.locator("#alpha-value").inner_text() == "85 %"

    # What-if threshold: the decision follows the slider, the score never changes.
    score = page.locator("#score").inner_text()
    decision = page.locator("#decision")
    assert decision.inner_text().startswith("FLAGGED for priority reading")
    page.locator("#whatif").fill("1")
    assert decision.inner_text() == f"What-if: Not flagged: score {score} < threshold 1.000"
    assert page.locator("#score").inner_text() == score
    page.locator("#whatif").fill("0.2")
    assert decision.inner_text() == f"What-if: FLAGGED for priority reading: score {score} ≥ threshold 0.200"
    page.locator("#whatif-reset").click()
    assert decision.inner_text() == f"FLAGGED for priority reading: score {score} ≥ threshold {site.threshold:.3f}"
    # The overlay really carries the colourised map (not a blank image).
    assert page.evaluate("""() => { const img = document.getElementById('heatmap-overlay');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const d = ctx.getImageData(0, 0, c.width, c.height).data; let m = 0;
        for (let i = 3; i < d.length; i += 4) m = Math.max(m, d[i]);
        return m; }""") == 255
    page.locator("#whatif").fill("0.99")
    page.screenshot(path=str(SHOTS / "study.png"), full_page=True)

    # Feedback through the form: POST, redirect, and the derived outcome on the page.
    assert page.locator("#reviewer").count() == 0  # the reviewer is whoever signed in
    page.check("input[name=finding][value=pneumonia]")
    page.fill("#comment", "right lower lobe consolidation")
    page.click("form.feedback-form button[type=submit]")
    page.wait_for_url(f"{base}/studies/{site.flagged}?saved=1#feedback")
    assert page.locator("#outcome").inner_text() == "TP"
    assert "by dr.browser" in page.locator("#recorded-finding").inner_text()
    with session_scope(site.settings.database_url) as s:
        study = repo.get_study(s, study_id=site.flagged)
        assert (study.finding, study.outcome, study.reviewer) == ("pneumonia", "TP", "dr.browser")
    page.goto(base + "/?view=read")
    assert page.locator("#body-read tr").first.get_attribute("data-study-id") == str(site.flagged)

    # A nurse sees the worklist and the recorded finding, but no feedback form and no admin pages.
    nurse = new_page(browser, problems)
    sign_in(nurse, base, "nurse.nina", f"/studies/{site.flagged}")
    assert nurse.locator("form.feedback-form").count() == 0 and nurse.locator("input[name=finding]").count() == 0
    assert "pneumonia" in nurse.locator("#recorded-finding").inner_text()
    assert nurse.locator('a[href="/admin/calibrations"]').count() == 0
    nurse.screenshot(path=str(SHOTS / "nurse_study.png"), full_page=True)
    unscored_page = f"/studies/{site.scored[-1]}"
    nurse.goto(base + unscored_page)
    assert "Findings are recorded by doctors" in nurse.locator("#no-finding").inner_text()
    assert nurse.locator("form.feedback-form").count() == 0
    # The DICOM study's page names the patient and shows its film decoded from the archived DICOM.
    nurse.goto(base + f"/studies/{dicom_id}")
    assert nurse.locator("#patient-name").inner_text() == "Testperson, Alice"
    assert nurse.locator("#accession").inner_text() == ACCESSION
    nurse.wait_for_function("() => document.getElementById('film-image').complete "
                            "&& document.getElementById('film-image').naturalWidth > 0")
    # The nurse closes her browser: an open study page keeps polling who is reading it, and a poll after the
    # clock jump below would be refused as well (rightly, but not what this test watches).
    nurse.context.close()

    # An admin sets a new threshold on the calibration page (a form with its CSRF token).
    admin = new_page(browser, problems)
    sign_in(admin, base, "ada", "/admin/calibrations")
    admin.fill("#threshold", "0.999")
    admin.click("#threshold-preview")  # first a preview: what would change, then a confirmation
    admin.wait_for_selector("#threshold-preview-panel")
    assert admin.locator("#preview-unflagged").inner_text() == "0"  # the flagged study was read above
    assert admin.locator("#preview-newly-flagged").inner_text() == "0"
    assert admin.locator("#preview-sensitivity").inner_text() == "0.0 %"  # the one pneumonia falls below 0.999
    assert admin.locator("#active-threshold").inner_text() == f"{site.threshold:.3f}"  # not changed yet
    admin.click("#threshold-confirm")
    admin.wait_for_url(base + "/admin/calibrations")
    assert "Threshold changed" in admin.locator("#notice").inner_text()
    assert admin.locator("#active-threshold").inner_text() == "0.999"
    admin.screenshot(path=str(SHOTS / "admin_calibrations.png"), full_page=True)
    # Signing out ends the session: the worklist asks for a sign-in again.
    admin.click("form.account button[type=submit]")
    admin.wait_for_url(base + "/login")
    assert "You are signed out." in admin.locator("#notice").inner_text()
    admin.goto(base + "/")
    admin.wait_for_url(base + "/login")
    admin.context.close()
    # The doctor's read view is still polling: 31 idle minutes later (the server's clock moved, no waiting)
    # its next poll is refused and the page goes to the sign-in page by itself, to come back after.
    monkeypatch.setattr(sessions, "now", lambda: time.time() + 31 * 60)
    page.wait_for_url(f"{base}/login?next=/%3Fview%3Dread", timeout=15_000)
    assert "without activity" in page.locator("#notice").inner_text()
    poll = f"401 {base}/fragments/worklist?view=read"
    assert poll in problems
    # No CSP violations, script errors or refusals anywhere on the way, but the refused sign-in and poll.
    refused = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    assert 1 <= problems.count(refused) <= 2
    assert [p for p in problems if p not in (refused, poll)] == []



def test_performance_page_and_recalibration_in_chromium(server, browser, tmp_path):
    """An admin reads the performance page (alerts, weekly table, plots), previews a recalibration on the last
    150 reviewed cases and puts it in force with one confirmed click; the worklist banner names the alert."""
    from dataclasses import replace

    import numpy as np
    from scipy.special import expit

    from core import calibrations, monitoring
    from core.ml.bundle import BundleMeta
    from tests.test_monitoring import add_scored

    site, base, _ = server
    bundle_dir = tmp_path / "bundle"  # the server fixture's bundle: give it a reference histogram
    meta = BundleMeta.read(bundle_dir)
    rng = np.random.default_rng(0)
    reference = monitoring.score_histogram(rng.normal(0.0, 3.0, 1000))
    replace(meta, extra={**meta.extra, "reference_scores": reference}).write(bundle_dir)
    site.settings.model_dir = bundle_dir
    z = rng.normal(2.0, 4.0, 150)  # over-confident and shifted: ECE and drift alerts
    y = rng.random(150) < expit(z / 3 - 1)
    with session_scope(site.settings.database_url) as s:
        for zi, yi in zip(z, y):
            add_scored(s, logit=float(zi), finding="pneumonia" if yi else "normal", model=meta.version,
                       received_at=utcnow() - dt.timedelta(days=2))
        before = calibrations.active(s).version
    problems: list[str] = []
    admin = new_page(browser, problems)
    sign_in(admin, base, "ada", "/")
    assert 'data-alert="ece"' in admin.locator("#monitor-banner").inner_html()
    admin.click("#monitor-banner a")
    admin.wait_for_url(base + "/admin/performance")
    assert admin.locator('#alerts [data-alert="ece"]').count() == 1
    assert admin.locator("#weekly tr.row-total").count() == 1
    admin.wait_for_function("() => ['reliability-plot', 'scores-plot'].map(id => document.getElementById(id))"
                            ".every(img => img.complete && img.naturalWidth > 0)")
    admin.fill("#recal-last", "150")
    admin.click("#recal-preview")
    admin.wait_for_selector("#preview")
    admin.wait_for_function("() => document.getElementById('recal-plot').complete "
                            "&& document.getElementById('recal-plot').naturalWidth > 0")
    new_version = admin.locator("#new-version").inner_text()
    admin.set_viewport_size({"width": 1100, "height": 900})
    admin.screenshot(path=str(SHOTS / "performance.png"), full_page=True)  # docs/performance.png comes from it
    admin.check("#recal-confirm")
    admin.click("#recal-activate")
    admin.wait_for_url(base + "/admin/performance")
    assert f"Calibration {new_version}" in admin.locator("#notice").inner_text()
    assert new_version in admin.locator("#perf-calibration").inner_text()
    with session_scope(site.settings.database_url) as s:
        assert calibrations.active(s).version == new_version and calibrations.get(s, version=before) is not None
    # A doctor reads the page without the recalibration form.
    doctor = new_page(browser, problems)
    sign_in(doctor, base, "dr.browser", "/admin/performance")
    assert doctor.locator("#weekly").count() == 1 and doctor.locator("#recal-form").count() == 0
    assert problems == []
