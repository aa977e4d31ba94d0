"""The web app over HTTP (TestClient): worklist, study page, films, heat-maps, feedback, export, health, safety.

Every request here is made by a user signed in through the login form (access rules: tests/test_web_auth.py).
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy.special import expit
from sqlalchemy import select

from core import auth
from core import calibrations
from core import repository as repo
from core import worklist_rows
from core.db import get_engine, session_scope
from core.feedback import COLUMNS
from core.films.imaging import load_grayscale
from core.migrate import upgrade
from core.ml.bundle import load_bundle
from core.ml.scoring import score_images
from core.models import Study, utcnow
from core.pipeline import process_studies
from core.settings import Settings
from tests.conftest import fixture_images
from web.app import create_app
from web.templating import CAVEAT

HTML = {"Accept": "text/html"}
PASSWORD = "correct horse battery staple"


@dataclass
class Site:
    """A data dir with a migrated SQLite DB holding studies in every state."""

    settings: Settings
    scored: list[int]  # real films scored by the pipeline, highest score first
    flagged: int  # the only flagged one (the split calibration puts the threshold below its score)
    overdue: int  # a low-score study waiting two hours (no film on disk)
    failed: int
    duplicate: int
    duplicate_of: int
    queued: int
    threshold: float
    sources: dict[int, Path]


def settings_for(root: Path, **overrides) -> Settings:
    return Settings(data_dir=root / "data", inbox=root / "inbox", **overrides)


def archive(settings: Settings, session, path: Path, received_at: dt.datetime | None = None) -> int:
    """Copies a file into the content-addressed archive and records a study, as the ingester does."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    dest = settings.archive_dir / f"{sha}{path.suffix}"
    shutil.copyfile(path, dest)
    return repo.create_study(session, source_name=path.name, sha256=sha, size_bytes=len(data),
                             stored_path=dest.relative_to(settings.data_dir).as_posix(), received_at=received_at).id


def build_site(root: Path, bundle_dir: Path, n_films: int = 3) -> Site:
    """Scores real fixture films with the real pipeline and adds failed, duplicate, queued and overdue studies."""
    settings = settings_for(root)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    films = fixture_images()[:n_films]
    bad = root / "not-an-image.png"
    bad.write_text("this is a text file named .png")
    with session_scope(settings.database_url) as s:
        ids = [archive(settings, s, p) for p in films]
        failed = archive(settings, s, bad)
        duplicate = archive(settings, s, films[0])
    bundle = load_bundle(bundle_dir, device="cpu")
    # A calibration whose threshold splits the top film from the rest (exactly one flagged), in force
    # before scoring so the flag at scoring, and hence the outcome of feedback, follows it.
    logits = [r.logit for r in score_images(bundle, [load_grayscale(p) for p in films])]
    top, second = sorted((float(expit(z)) for z in logits), reverse=True)[:2]
    assert top > second, "the films need distinct scores"
    threshold = (top + second) / 2
    with session_scope(settings.database_url) as s:
        calibrations.register(s, version="split", model_version=bundle.version, kind="temperature",
                              params={"temperature": 1.0}, threshold=threshold, source="test", actor="test")
        calibrations.activate(s, version="split", actor="test")
    assert process_studies(ids + [failed], bundle=bundle, settings=settings, worker="test") == {
        **{i: "scored" for i in ids}, failed: "failed"}
    with session_scope(settings.database_url) as s:
        scores = {i: repo.get_study(s, study_id=i).score for i in ids}
        ranked = sorted(ids, key=lambda i: -scores[i])
        assert [repo.get_study(s, study_id=i).scored_flagged for i in ranked] == [True] + [False] * (len(ids) - 1)
        queued = archive(settings, s, fixture_images()[-1])
        overdue = repo.create_study(s, source_name="old-low.jpeg", sha256="0" * 64, size_bytes=1,
                                    stored_path="archive/absent.jpeg",
                                    received_at=utcnow() - dt.timedelta(minutes=settings.max_wait_minutes + 60)).id
        token = repo.claim_study(s, study_id=overdue, worker="test")
        assert repo.save_score(s, study_id=overdue, token=token, logit=-6.0, model_version=bundle.version,
                               score=float(1 / (1 + np.exp(6.0))), threshold=threshold, calibration_version="split",
                               width=100, height=100, heatmap_path="heatmaps/absent.png", timings={})
    get_engine(settings.database_url).dispose()  # checkpoint the WAL so the folder can be copied
    return Site(settings, ranked, ranked[0], overdue, failed, duplicate, ids[0], queued, threshold,
                {i: p for i, p in zip(ids, films)})


@pytest.fixture(scope="module")
def site_template(tmp_path_factory, bundle_dir) -> Site:
    return build_site(tmp_path_factory.mktemp("site"), bundle_dir)


@pytest.fixture
def site(site_template, tmp_path) -> Site:
    """A private copy of the scored site, so tests that record feedback do not affect each other."""
    shutil.copytree(site_template.settings.data_dir, tmp_path / "data")
    settings = settings_for(tmp_path)
    yield Site(**{**site_template.__dict__, "settings": settings})
    get_engine(settings.database_url).dispose()


def add_user(settings: Settings, name: str, role: str, password: str = PASSWORD) -> None:
    """Creates an account directly in the database, as `chestaid user add` does."""
    with session_scope(settings.database_url) as s:
        auth.create_user(s, name=name, role=role, password=password, actor="test")


def csrf_token(client: TestClient, url: str = "/") -> str:
    """Returns the session's CSRF token, read from a page like the browser's forms and htmx do."""
    html = client.get(url, headers=HTML).text
    return re.search(r'<meta name="csrf-token" content="([^"]+)">', html).group(1)


def sign_in(client: TestClient, name: str, password: str = PASSWORD) -> None:
    """Signs in through the login form (with its CSRF token)."""
    token = csrf_token(client, "/login")
    r = client.post("/login", data={"name": name, "password": password, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert csrf_token(client) != token  # a new session gets a new token


@pytest.fixture
def client(site) -> TestClient:
    """A doctor ("grey") signed in: sees everything a clinician sees and records findings."""
    add_user(site.settings, "grey", "doctor")
    with TestClient(create_app(site.settings)) as c:
        sign_in(c, "grey")
        yield c


@pytest.fixture
def admin_client(site) -> TestClient:
    """An admin ("ada") signed in: also exports feedback."""
    add_user(site.settings, "ada", "admin")
    with TestClient(create_app(site.settings)) as c:
        sign_in(c, "ada")
        yield c


def post_form(client: TestClient, url: str, data: dict, **kwargs):
    """Posts a browser form: the page's CSRF token goes along as the hidden field does."""
    return client.post(url, data={**data, "csrf_token": csrf_token(client)}, **kwargs)


def post_json(client: TestClient, url: str, body: dict):
    """Posts JSON from the signed-in browser session (the CSRF token as a header, as htmx sends it)."""
    return client.post(url, json=body, headers={"X-CSRF-Token": csrf_token(client)})


def row_ids(html: str, section: str) -> list[int]:
    body = re.search(rf'<tbody id="body-{section}"[^>]*>(.*?)</tbody>', html, re.S).group(1)
    return [int(i) for i in re.findall(r'data-study-id="(\d+)"', body)]


def row_html(html: str, study_id: int) -> str:
    return re.search(rf'<tr[^>]*data-study-id="{study_id}".*?</tr>', html, re.S).group(0)


# --- worklist ----------------------------------------------------------------------------------------


def test_worklist_orders_flags_and_sections(client, admin_client, site):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    # Flagged first, then the overdue low-risk study above the other unflagged ones, then by score.
    assert row_ids(html, "unread") == [site.flagged, site.overdue, *site.scored[1:]]
    flagged_row = row_html(html, site.flagged)
    assert 'class="row-flagged' in flagged_row and f"FLAGGED ≥ {site.threshold:.3f}" in flagged_row
    assert 'class="icon"' in flagged_row  # an icon besides the text and the colour
    overdue_row = row_html(html, site.overdue)
    assert "OVERDUE" in overdue_row and "FLAGGED" not in overdue_row and "row-overdue" in overdue_row
    assert "2 h 00 min" in overdue_row or "2 h 01 min" in overdue_row  # time waiting is shown
    for sid in site.scored[1:]:
        assert "FLAGGED" not in row_html(html, sid) and "routine" in row_html(html, sid)
    assert row_ids(html, "in_progress") == [site.queued]
    assert row_ids(html, "failed") == [site.failed]
    assert "not a PNG, JPEG or DICOM file" in row_html(html, site.failed)
    assert row_ids(html, "duplicates") == [site.duplicate]
    assert f'<a href="/studies/{site.duplicate_of}">study #{site.duplicate_of}</a>' in row_html(html, site.duplicate)
    assert CAVEAT in html
    assert 'href="/api/feedback.csv"' not in html  # the export is for admins
    admin_html = admin_client.get("/").text
    assert 'href="/api/feedback.csv"' in admin_html and "Export feedback CSV" in admin_html


def test_worklist_status_strip_and_polling(client, site):
    html = client.get("/").text
    strip = re.search(r'<section id="status-strip".*?</section>', html, re.S).group(0)
    assert re.search(r"Queue</dt>\s*<dd><strong>1</strong>", strip)
    assert re.search(r"Workers alive</dt>\s*<dd><strong>0</strong>", strip) and "not being scored" in strip
    assert "split" in strip and f"{site.threshold:.3f}" in strip
    with session_scope(site.settings.database_url) as s:
        repo.heartbeat(s, name="w1", model_version="model-abc", device="cpu")
    strip = re.search(r'<section id="status-strip".*?</section>', client.get("/").text, re.S).group(0)
    assert re.search(r"Workers alive</dt>\s*<dd><strong>1</strong>", strip) and "model-abc" in strip
    # Auto-refresh: htmx polls a fragment at the configured interval; only bodies, counts and the strip change.
    assert f'hx-get="/fragments/worklist?view=unread" hx-trigger="every {site.settings.refresh_seconds}s"' in html
    frag = client.get("/fragments/worklist")
    assert frag.status_code == 200 and "<html" not in frag.text and "<main" not in frag.text
    assert '<template><tbody id="body-unread" hx-swap-oob="true">' in frag.text
    assert 'id="status-strip" class="strip" aria-label="Service status" hx-swap-oob="true"' in frag.text
    assert row_ids(frag.text, "unread") == row_ids(html, "unread")
    assert re.search(r'id="count-unread" hx-swap-oob="true">4<', frag.text)


def test_pages_load_scripts_only_from_static_files(client):
    html = client.get("/").text + client.get("/studies/1").text
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all(body.strip() == "" and 'src="/static/' in attrs for attrs, body in scripts)
    assert "http://" not in html.replace("http://testserver", "") and "https://" not in html
    assert " style=" not in html  # inline styles would break the CSP
    r = client.get("/static/htmx.min.js")
    assert r.status_code == 200 and r.text.startswith("/*! htmx 2.") and "Zero-Clause BSD" in r.text[:300]
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


def test_read_view_lists_studies_with_a_finding(client, site):
    assert row_ids(client.get("/?view=read").text, "read") == []
    post_form(client, f"/studies/{site.scored[1]}/feedback", {"finding": "normal"})
    for url in ("/?view=read", "/read"):
        html = client.get(url).text
        assert row_ids(html, "read") == [site.scored[1]]
        assert "<td>grey</td>" in row_html(html, site.scored[1]) and 'id="body-unread"' not in html
    assert site.scored[1] not in row_ids(client.get("/").text, "unread")
    assert client.get("/?view=bogus", headers=HTML).status_code == 422


# --- study page, film and heat-map -----------------------------------------------------------------------


def test_study_page_shows_score_threshold_decision_and_caveat(client, site):
    with session_scope(site.settings.database_url) as s:
        st = repo.get_study(s, study_id=site.flagged)
        score, threshold = st.score, st.threshold
    html = client.get(f"/studies/{site.flagged}").text
    assert f'<span id="score" class="score-big">{score:.3f}</span>' in html
    assert f'<span id="threshold">{threshold:.3f}</span>' in html
    # Enough digits that the comparison reads true (the flagged score is within 0.0005 of the threshold here).
    d = next(d for d in range(3, 10) if f"{score:.{d}f}" != f"{threshold:.{d}f}")
    assert f"FLAGGED for priority reading: score {score:.{d}f} ≥ threshold {threshold:.{d}f}" in html
    assert float(f"{score:.{d}f}") >= float(f"{threshold:.{d}f}")
    assert CAVEAT in html
    assert f'src="/studies/{site.flagged}/image"' in html and f'src="/studies/{site.flagged}/heatmap.png"' in html
    assert 'id="alpha"' in html and f'data-score="{score}"' in html and f'data-threshold="{threshold}"' in html
    assert 'src="/static/study.js"' in html
    unflagged = client.get(f"/studies/{site.scored[-1]}").text
    assert "Not flagged: score" in unflagged and "FLAGGED for priority" not in unflagged


def test_failed_duplicate_and_queued_study_pages(client, site):
    html = client.get(f"/studies/{site.failed}").text
    assert "could not be scored" in html and "not a PNG, JPEG or DICOM file" in html and CAVEAT in html
    assert 'id="film-image"' not in html and "feedback-form" not in html
    html = client.get(f"/studies/{site.duplicate}").text
    assert f'<a href="/studies/{site.duplicate_of}">study #{site.duplicate_of}</a>' in html
    assert "byte-identical copy" in html
    html = client.get(f"/studies/{site.queued}").text
    assert "This film is queued" in html and f'hx-get="/studies/{site.queued}"' in html


def test_film_and_heatmap_are_pngs_of_the_film_size(client, site):
    for sid in site.scored:
        film = client.get(f"/studies/{sid}/image")
        assert film.status_code == 200 and film.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(film.content))
        expected = load_grayscale(site.sources[sid])
        assert img.mode == "L" and img.size == expected.size
        assert np.array_equal(np.asarray(img), np.asarray(expected))  # the decoded film, losslessly
        heat = client.get(f"/studies/{sid}/heatmap.png")
        assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
        hm = Image.open(io.BytesIO(heat.content))
        assert hm.mode == "RGBA" and hm.size == expected.size  # the stored 7×7 grid, upsampled to the film
        with Image.open(site.settings.data_dir / "heatmaps" / f"{sid}.png") as grid:
            peak = np.unravel_index(int(np.asarray(grid).argmax()), (7, 7))
        shown = np.asarray(hm)[..., 3]  # opacity rises with attention: it peaks where the grid does
        row, col = np.unravel_index(int(shown.argmax()), shown.shape)
        assert abs(row / shown.shape[0] - (peak[0] + 0.5) / 7) < 1 / 7
        assert abs(col / shown.shape[1] - (peak[1] + 0.5) / 7) < 1 / 7
    # Colourising: a known map (a left-to-right ramp) written where the pipeline put the study's map.
    sid = site.scored[0]
    width, height = load_grayscale(site.sources[sid]).size
    ramp = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    Image.fromarray(ramp).save(site.settings.data_dir / "heatmaps" / f"{sid}.png")
    rgba = np.asarray(Image.open(io.BytesIO(client.get(f"/studies/{sid}/heatmap.png").content))).astype(int)
    cold, mid, hot = rgba[0, 0], rgba[0, width // 2], rgba[0, -1]
    assert cold[3] == 0 and hot[3] == 255 and 0 < mid[3] < 255  # opacity rises with attention
    assert np.all(np.diff(rgba[0, :, 3]) >= 0)
    assert hot[0] > 100 and hot[2] == 0  # hottest: red, no blue
    assert cold[2] > 100 and cold[0] == 0  # coldest: blue, no red
    assert mid[1] == 255  # middle: green/yellow
    failed = client.get(f"/studies/{site.failed}/image")
    assert failed.status_code == 404 and "not a PNG, JPEG or DICOM file" in failed.text
    assert client.get(f"/studies/{site.failed}/heatmap.png").status_code == 404
    missing = client.get(f"/studies/{site.overdue}/image")
    assert missing.status_code == 404 and "missing" in missing.text


# --- feedback and export -----------------------------------------------------------------------------------


def test_feedback_form_records_finding_and_shows_outcome(client, site):
    page = client.get(f"/studies/{site.flagged}").text
    assert 'name="reviewer"' not in page and "Recorded under your name, <strong>grey</strong>" in page
    # A reviewer field sent anyway is ignored: the reviewer is whoever is signed in.
    r = post_form(client, f"/studies/{site.flagged}/feedback", follow_redirects=False,
                  data={"finding": "pneumonia", "comment": "  RLL consolidation ", "reviewer": "Dr Imposter"})
    assert r.status_code == 303 and r.headers["location"] == f"/studies/{site.flagged}?saved=1#feedback"
    html = client.get(r.headers["location"]).text
    assert '<strong id="outcome" class="outcome">TP</strong>' in html and "true positive" in html
    assert "Feedback saved." in html and "by grey" in html and "RLL consolidation" in html
    assert "Imposter" not in html
    with session_scope(site.settings.database_url) as s:
        st = repo.get_study(s, study_id=site.flagged)
        assert (st.finding, st.outcome, st.reviewer, st.finding_comment) == ("pneumonia", "TP", "grey",
                                                                             "RLL consolidation")
    # An unflagged study read as pneumonia is a false negative.
    r = post_form(client, f"/studies/{site.scored[-1]}/feedback", data={"finding": "pneumonia"})
    assert r.status_code == 200 and '<strong id="outcome" class="outcome">FN</strong>' in r.text
    assert "by grey" in r.text


def test_feedback_form_rejects_bad_input(client, site):
    r = post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "maybe"})
    assert r.status_code == 422 and "Choose the finding" in r.text
    r = post_form(client, f"/studies/{site.flagged}/feedback", {})
    assert r.status_code == 422 and "Choose the finding" in r.text
    r = post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "normal", "comment": "x" * 2001})
    assert r.status_code == 422 and "limited to 2000 characters" in r.text
    r = post_form(client, f"/studies/{site.failed}/feedback", {"finding": "normal"})
    assert r.status_code == 409 and "only be recorded for scored studies" in r.text
    with session_scope(site.settings.database_url) as s:
        assert repo.get_study(s, study_id=site.flagged).finding is None
        assert repo.get_study(s, study_id=site.failed).finding is None


def test_feedback_api(client, site):
    r = post_json(client, f"/api/studies/{site.flagged}/feedback", {"finding": "normal", "comment": "clear"})
    assert r.status_code == 200
    body = r.json()
    assert (body["finding"], body["outcome"], body["reviewer"], body["comment"], body["section"]) == (
        "normal", "FP", "grey", "clear", "read")
    r = post_json(client, f"/api/studies/{site.scored[-1]}/feedback", {"finding": "normal", "reviewer": "Dr X"})
    assert r.json()["outcome"] == "TN" and r.json()["reviewer"] == "grey"
    assert post_json(client, f"/api/studies/{site.scored[1]}/feedback", {"finding": "yes"}).status_code == 422
    assert post_json(client, f"/api/studies/{site.scored[1]}/feedback", {}).status_code == 422
    r = post_json(client, f"/api/studies/{site.failed}/feedback", {"finding": "normal"})
    assert r.status_code == 409 and "failed" in r.json()["detail"]
    r = post_json(client, f"/api/studies/{site.queued}/feedback", {"finding": "normal"})
    assert r.status_code == 409
    r = post_json(client, "/api/studies/99999/feedback", {"finding": "normal"})
    assert r.status_code == 404 and r.json() == {"detail": "study 99999 not found"}


def test_feedback_csv_export(client, admin_client, site):
    empty = admin_client.get("/api/feedback.csv")
    assert empty.status_code == 200 and empty.text.strip() == ",".join(COLUMNS)
    post_json(client, f"/api/studies/{site.flagged}/feedback", {"finding": "pneumonia", "comment": "lobar"})
    r = admin_client.get("/api/feedback.csv")
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'attachment; filename="feedback.csv"'
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0].keys()) == COLUMNS and len(rows) == 1
    with session_scope(site.settings.database_url) as s:
        st = repo.get_study(s, study_id=site.flagged)
        expected = {"study_id": str(st.id), "model_version": st.model_version, "calibration_version": "split",
                    "logit": repr(st.logit), "score": repr(st.scored_score), "threshold": repr(st.scored_threshold),
                    "flagged": "1", "finding": "pneumonia", "outcome": "TP", "reviewer": "grey",
                    "comment": "lobar"}
    assert {k: rows[0][k] for k in expected} == expected
    assert site.sources[site.flagged].name not in r.text  # source file names can carry patient names


# --- JSON API --------------------------------------------------------------------------------------------------


def test_api_lists_studies_in_worklist_order(client, site):
    r = client.get("/api/studies")
    assert r.status_code == 200
    items = r.json()
    assert [i["id"] for i in items] == [site.flagged, site.overdue, *site.scored[1:], site.queued, site.failed,
                                        site.duplicate]
    assert [i["section"] for i in items] == ["unread"] * 4 + ["in_progress", "failed", "duplicates"]
    first = items[0]
    for field in ("id", "source_name", "status", "received_at", "scored_at", "score", "threshold", "flagged",
                  "model_version", "calibration_version", "error", "finding", "outcome", "overdue",
                  "waiting_seconds"):
        assert field in first
    assert first["flagged"] is True and first["calibration_version"] == "split" and first["status"] == "scored"
    assert first["threshold"] == pytest.approx(site.threshold) and first["overdue"] is False
    assert items[1]["overdue"] is True and items[1]["waiting_seconds"] >= 120 * 60
    failed = next(i for i in items if i["id"] == site.failed)
    assert failed["status"] == "failed" and failed["error"] == "not a PNG, JPEG or DICOM file"
    assert [i["id"] for i in client.get("/api/studies?section=failed").json()] == [site.failed]
    assert [i["id"] for i in client.get("/api/studies?section=unread&limit=2").json()] == [site.flagged, site.overdue]
    assert client.get("/api/studies?section=nope").status_code == 422
    one = client.get(f"/api/studies/{site.flagged}").json()
    assert one == {**first, "waiting_seconds": one["waiting_seconds"]}
    r = client.get("/api/studies/99999")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "study 99999 not found"}


# --- health -------------------------------------------------------------------------------------------------------


def test_healthz_needs_a_live_worker_with_a_model(client, admin_client, site):
    # Public (and non-admin) callers get the status alone; signed-in admins get the parts and the workers.
    anonymous = TestClient(create_app(site.settings))
    for c in (anonymous, client):
        r = c.get("/healthz")
        assert (r.status_code, r.json()) == (503, {"status": "unavailable"})
    r = admin_client.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "db": "ok", "broker": "ok", "workers": 0, "model_loaded": False,
                        "model_versions": [], "worker_devices": []}
    with session_scope(site.settings.database_url) as s:
        repo.heartbeat(s, name="starting", model_version=None, device=None)  # alive, model not loaded yet
    r = admin_client.get("/healthz")
    assert r.status_code == 503 and r.json()["workers"] == 1 and r.json()["model_loaded"] is False
    with session_scope(site.settings.database_url) as s:
        repo.heartbeat(s, name="w1", model_version="m-1", device="cuda:0 bf16 412 img/s")
    for c in (anonymous, client):
        r = c.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        assert "m-1" not in r.text and "w1" not in r.text
    r = admin_client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "db": "ok", "broker": "ok", "workers": 2, "model_loaded": True,
                        "model_versions": ["m-1"], "worker_devices": [
                            {"name": "starting", "model_version": None, "device": None},
                            {"name": "w1", "model_version": "m-1", "device": "cuda:0 bf16 412 img/s"}]}
    anonymous.close()


def test_healthz_reports_an_unreachable_broker(site, tmp_path):
    with session_scope(site.settings.database_url) as s:
        repo.heartbeat(s, name="w1", model_version="m-1", device="cpu")
    add_user(site.settings, "ops", "admin")
    for broker in ("redis://127.0.0.1:1/0", f"sqla+sqlite:///{tmp_path}/no/such/dir/broker.db"):
        settings = Settings(data_dir=site.settings.data_dir, inbox=site.settings.inbox, broker_url=broker)
        with TestClient(create_app(settings)) as c:
            assert c.get("/healthz").json() == {"status": "unavailable"}
            sign_in(c, "ops")
            r = c.get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert (body["db"], body["model_loaded"], body["status"]) == ("ok", True, "unavailable")
        assert body["broker"] == "unavailable"  # the reason goes to the server log only


def test_unmigrated_database_gets_a_clear_503(tmp_path):
    settings = Settings(data_dir=tmp_path, inbox=tmp_path / "inbox")  # SQLite file exists, no tables
    with TestClient(create_app(settings)) as c:
        page = c.get("/", headers=HTML)  # → the sign-in page, which needs the accounts table
        api = c.get("/api/studies", headers={"Authorization": "Bearer ca_" + "x" * 43})
    assert page.status_code == 503 and "run `chestaid migrate`" in page.text and CAVEAT in page.text
    assert page.url.path == "/login"
    assert api.status_code == 503 and "not migrated" in api.json()["detail"]
    get_engine(settings.database_url).dispose()


def test_openapi_schema_is_local(client):
    assert client.get("/docs").status_code == 404  # Swagger UI would load code from a CDN
    schema = client.get("/openapi.json").json()
    assert {"/api/studies", "/api/studies/{study_id}", "/api/studies/{study_id}/feedback", "/api/feedback.csv",
            "/healthz"} <= set(schema["paths"])


def test_healthz_reports_an_unreachable_database(tmp_path):
    settings = Settings(data_dir=tmp_path, inbox=tmp_path / "inbox",
                        database_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite")
    with TestClient(create_app(settings)) as c:
        r = c.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}


# --- safety ---------------------------------------------------------------------------------------------------------


def test_unknown_study_is_404(client):
    r = client.get("/studies/99999", headers=HTML)
    assert r.status_code == 404 and "study 99999 not found" in r.text and "<html" in r.text
    assert client.get("/studies/99999/image").status_code == 404
    assert client.get("/studies/99999/heatmap.png").status_code == 404
    assert client.get("/studies/abc").status_code == 404


@pytest.mark.parametrize("url", [
    "/studies/..%2f..%2fchestaid.db", "/studies/..%2f..%2f..%2fetc%2fpasswd/image", "/studies/1/..%2f..%2fchestaid.db",
    "/studies/%2e%2e/%2e%2e/etc/passwd", "/studies/1%2f..%2f..%2fchestaid.db/image",
    "/static/..%2f..%2fcore%2fsettings.py", "/static/%2e%2e/app.py", "/studies/-1/image",
])
def test_request_paths_never_reach_the_file_system(client, url):
    r = client.get(url)
    assert r.status_code == 404
    assert b"SQLite format" not in r.content and b"root:" not in r.content and b"BaseSettings" not in r.content


def test_paths_from_the_database_must_stay_inside_the_data_dir(client, site, tmp_path):
    secret = tmp_path / "outside.png"
    Image.new("L", (80, 80), 200).save(secret)
    rel = Path("..") / secret.relative_to(tmp_path)  # data dir is tmp_path/data
    with session_scope(site.settings.database_url) as s:
        st = repo.get_study(s, study_id=site.scored[1])
        st.stored_path, st.heatmap_path = rel.as_posix(), str(secret)
    for url in (f"/studies/{site.scored[1]}/image", f"/studies/{site.scored[1]}/heatmap.png"):
        r = client.get(url)
        assert r.status_code == 404 and "outside the data directory" in r.text


def test_module_app_is_lazy(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTAID_DATA_DIR", str(tmp_path / "never"))
    app = create_app()
    assert app.state.settings is None and not (tmp_path / "never").exists()
    import web.app

    assert web.app.app.state.settings is None  # uvicorn web.app:app reads settings on the first request


# --- paging and the idle poll -----------------------------------------------------------------------------------


def test_api_pages_follow_link_next_to_every_row_once(client, site):
    everything = [i["id"] for i in client.get("/api/studies").json()]
    assert "link" not in client.get("/api/studies").headers  # one page holds it all
    seen, url = [], "/api/studies?limit=2"
    while url:
        r = client.get(url)
        assert r.status_code == 200 and len(r.json()) <= 2
        seen += [i["id"] for i in r.json()]
        link = r.headers.get("link")
        url = re.search(r'<http://testserver([^>]+)>; rel="next"', link).group(1) if link else None
    assert seen == everything and len(seen) == 7  # across the sections, in order, each once
    big = client.get(f"/api/studies?limit={site.settings.max_page_size + 1}")
    assert big.status_code == 422 and "maximum page size" in big.json()["detail"]
    bad = client.get("/api/studies?cursor=not-a-cursor")
    assert bad.status_code == 422 and "invalid page cursor" in bad.json()["detail"]


def test_api_search_by_accession_patient_file_name_or_id(client, site):
    name = site.sources[site.flagged].name
    same_name = [site.flagged] + ([site.duplicate] if site.duplicate_of == site.flagged else [])  # a copy keeps it
    found = client.get(f"/api/studies?q={name}").json()
    assert [i["id"] for i in found] == sorted(same_name, reverse=True)  # newest first
    assert {i["id"]: i["section"] for i in found}[site.flagged] == "unread"
    assert [i["id"] for i in client.get(f"/api/studies?q=%23{site.failed}").json()] == [site.failed]
    assert client.get("/api/studies?q=nothing-like-this").json() == []


def test_worklist_pages_have_next_links_and_the_poll_refreshes_the_page_shown(site):
    settings = site.settings.model_copy(update={"page_size": 2})
    add_user(settings, "pat", "nurse")
    with TestClient(create_app(settings)) as c:
        sign_in(c, "pat")
        html = c.get("/").text
        assert row_ids(html, "unread") == [site.flagged, site.overdue]
        nxt = re.search(r'class="page-next" rel="next" href="([^"]+)"', html).group(1).replace("&amp;", "&")
        page2 = c.get(nxt).text
        assert row_ids(page2, "unread") == site.scored[1:]
        assert "Rows 3–4 of 4" in page2 and 'class="page-first"' in page2 and "page-next" not in row_html(
            page2, site.scored[-1])
        poll = re.search(r'hx-get="(/fragments/worklist\?[^"]+)"', page2).group(1).replace("&amp;", "&")
        assert "section=unread" in poll and row_ids(c.get(poll).text, "unread") == site.scored[1:]
        assert c.get("/?view=unread&section=unread&cursor=bogus").status_code == 422


def test_side_sections_show_a_short_page_under_the_list_to_read(site):
    # The failed, refused, duplicate and in-progress tables show side_page_size rows with the full count and a
    # "Next" page; the list to read keeps page_size.
    settings = site.settings.model_copy(update={"page_size": 50, "side_page_size": 1})
    add_user(settings, "sam", "nurse")
    with session_scope(settings.database_url) as s:
        for i in range(2):  # two more failures, newer than the site's own
            junk = settings.data_dir / f"junk{i}.png"
            junk.write_text(f"not a film {i}")
            repo.mark_failed(s, study_id=archive(settings, s, junk), reason="not a PNG, JPEG or DICOM file")
        failed = [st.id for st in s.scalars(select(Study).where(Study.status == "failed")
                                             .order_by(Study.received_at.desc(), Study.id.desc()))]
    assert len(failed) == 3
    with TestClient(create_app(settings)) as c:
        sign_in(c, "sam")
        html = c.get("/").text
        assert row_ids(html, "unread") == [site.flagged, site.overdue, *site.scored[1:]]
        assert row_ids(html, "failed") == failed[:1]
        assert re.search(r'id="count-failed">(\d+)<', html).group(1) == str(len(failed))
        nxt = re.findall(r'class="page-next" rel="next" href="([^"]+section=failed[^"]*)"', html)
        assert nxt
        page2 = c.get(nxt[0].replace("&amp;", "&")).text
        assert row_ids(page2, "failed") == failed[1:2]
        assert row_ids(page2, "unread") == [site.flagged, site.overdue, *site.scored[1:]]  # first page of the others


def test_idle_poll_answers_304_and_a_change_gives_a_new_version(client, site):
    # Waiting times are shown to the second under a minute; age the studies so that only real changes count.
    with session_scope(site.settings.database_url) as s:
        for study in s.scalars(select(Study)):
            study.received_at -= dt.timedelta(minutes=10)
        worklist_rows.rebuild(s)
    for _ in range(3):  # a minute boundary between the two polls legitimately moves the waiting times shown
        etag = client.get("/fragments/worklist").headers["etag"]
        idle = client.get("/fragments/worklist", headers={"If-None-Match": etag})
        if idle.status_code == 304:
            break
    assert idle.status_code == 304 and idle.content == b"" and idle.headers["etag"] == etag
    r = post_json(client, f"/api/studies/{site.flagged}/feedback", {"finding": "pneumonia"})
    assert r.status_code == 200
    changed = client.get("/fragments/worklist", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert site.flagged not in row_ids(changed.text, "unread")
