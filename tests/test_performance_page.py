"""The performance page over HTTP on migrated SQLite and Postgres: role checks, the weekly CSV, the plots, the
admins' worklist banner, the study page's calibration note, and the recalibration round trip (preview →
confirmed activation → studies re-scored from stored logits → audit rows), with its refusals."""
from __future__ import annotations

import csv
import datetime as dt
import io
import re
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy.special import expit
from sqlalchemy import select

from core import calibrations, monitoring
from core.db import get_engine, session_scope
from core.ml.bundle import BundleMeta
from core.ml.calibration import calibrator_from_dict
from core.models import AuditEvent, Study, utcnow
from core.settings import Settings
from tests.conftest import make_bundle
from tests.test_monitoring import add_scored
from tests.test_web import HTML, add_user, csrf_token, sign_in
from web.app import create_app


@pytest.fixture
def site(db_url, tmp_path):
    """A bundle with a reference histogram, its calibration in force, and 200 reviewed cases of a hospital where
    the model is over-confident (pneumonia with probability σ(z/3 − 1)): the ECE alert fires."""
    bundle = make_bundle(tmp_path / "bundle")
    described = BundleMeta.read(bundle)
    rng = np.random.default_rng(0)
    reference = monitoring.score_histogram(rng.normal(1.0, 4.0, 1000))
    described = replace(described, extra={**described.extra, "reference_scores": reference})
    described.write(bundle)
    meta = described.to_dict()
    settings = Settings(data_dir=tmp_path / "data", inbox=tmp_path / "inbox", database_url=db_url, model_dir=bundle)
    settings.ensure_dirs()
    z = rng.normal(1.0, 4.0, 200)
    y = rng.random(200) < expit(z / 3 - 1)
    with session_scope(db_url) as s:
        calibrations.ensure_bundle(s, bundle_meta=meta, source=str(bundle), actor="test")
        for zi, yi in zip(z, y):
            add_scored(s, logit=float(zi), finding="pneumonia" if yi else "normal", model=meta["version"],
                       received_at=utcnow() - dt.timedelta(days=1))
    for name, role in (("ada", "admin"), ("doc", "doctor"), ("nur", "nurse")):
        add_user(settings, name, role)
    yield settings, meta
    get_engine(db_url).dispose()


def client_for(settings, name: str | None) -> TestClient:
    c = TestClient(create_app(settings))
    if name:
        sign_in(c, name)
    return c


def test_roles_on_the_performance_routes(site):
    settings, _ = site
    anonymous, nurse, doctor = (client_for(settings, n) for n in (None, "nur", "doc"))
    assert anonymous.get("/admin/performance", headers=HTML, follow_redirects=False).status_code == 303
    for url in ("/admin/performance", "/admin/performance.csv", "/admin/performance/reliability.png",
                "/admin/performance/scores.png", "/admin/performance/recalibrate/reliability.png?last=200"):
        assert nurse.get(url).status_code == 403, url
    page = doctor.get("/admin/performance", headers=HTML)
    assert page.status_code == 200 and 'id="weekly"' in page.text
    assert 'id="recal-form"' not in page.text  # doctors read, admins act
    token = csrf_token(doctor)
    for url in ("/admin/performance/recalibrate/preview", "/admin/performance/recalibrate/activate"):
        assert doctor.post(url, data={"csrf_token": token, "expected": "x", "confirm": "yes"}).status_code == 403
    assert doctor.get("/admin/performance/recalibrate/reliability.png?last=200").status_code == 403
    admin = client_for(settings, "ada")
    # Without the session's CSRF token, nothing is fitted or activated.
    assert admin.post("/admin/performance/recalibrate/preview", data={"last": "200"}).status_code == 403


def test_page_csv_plots_banner_and_log(site, caplog):
    settings, meta = site
    doctor, admin = client_for(settings, "doc"), client_for(settings, "ada")
    html = doctor.get("/admin/performance", headers=HTML).text
    assert 'data-alert="ece"' in html and "What to do:" in html
    assert re.search(r'id="perf-cases">200 ', html) and 'id="scores-plot"' in html
    rows = list(csv.DictReader(io.StringIO(doctor.get("/admin/performance.csv").text)))
    with session_scope(settings.database_url) as s:
        weeks, overall = monitoring.weekly(s)
    assert [r["week_start"] for r in rows] == [w.start.isoformat() for w in weeks] + ["all"]
    total = rows[-1]
    assert (int(total["scored"]), int(total["reviewed"])) == (200, 200)
    assert [int(total[k]) for k in ("tp", "fp", "tn", "fn")] == [overall.tp, overall.fp, overall.tn, overall.fn]
    assert float(total["sensitivity_low"]) == pytest.approx(overall.sensitivity.low, abs=1e-4)
    for url in ("/admin/performance/reliability.png", "/admin/performance/scores.png"):
        r = doctor.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    # The worklist banner is for admins only.
    assert 'id="monitor-banner"' in admin.get("/", headers=HTML).text
    assert 'id="monitor-banner"' not in doctor.get("/", headers=HTML).text


def test_recalibration_round_trip_through_the_page(site):
    settings, meta = site
    admin = client_for(settings, "ada")
    token = csrf_token(admin, "/admin/performance")
    window = {"window": "last", "last": "200", "start": "", "end": ""}
    preview = admin.post("/admin/performance/recalibrate/preview", data={**window, "csrf_token": token})
    assert preview.status_code == 200, preview.text
    version = re.search(r'name="expected" value="([^"]+)"', preview.text).group(1)
    assert 'data-row="before"' in preview.text and "cross-validated" in preview.text
    plot = admin.get("/admin/performance/recalibrate/reliability.png", params=window)
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    with session_scope(settings.database_url) as s:
        assert calibrations.get(s, version=version) is None  # a preview registers nothing

    # Unconfirmed, or confirmed for a calibration other than the one previewed: refused, nothing changes.
    assert admin.post("/admin/performance/recalibrate/activate",
                      data={**window, "csrf_token": token, "expected": version}).status_code == 422
    stale = admin.post("/admin/performance/recalibrate/activate",
                       data={**window, "csrf_token": token, "expected": "temperature-00000000", "confirm": "yes"})
    assert stale.status_code == 409 and "changed since the preview" in stale.text
    with session_scope(settings.database_url) as s:
        before = {st.id: st.score for st in s.scalars(select(Study))}
        original = calibrations.active(s).version

    done = admin.post("/admin/performance/recalibrate/activate",
                      data={**window, "csrf_token": token, "expected": version, "confirm": "yes"},
                      follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/admin/performance"
    assert f"Calibration {version}" in admin.get("/admin/performance", headers=HTML).text
    with session_scope(settings.database_url) as s:
        cal = calibrations.active(s)
        assert (cal.version, cal.model_version) == (version, meta["version"])
        studies = s.scalars(select(Study).order_by(Study.id)).all()
        expected = calibrator_from_dict({"kind": cal.kind, "params": cal.params}).predict([st.logit for st in studies])
        np.testing.assert_allclose([st.score for st in studies], expected, atol=1e-12)  # from stored logits
        assert [st.flagged for st in studies] == [bool(e >= cal.threshold) for e in expected]
        assert {st.calibration_version for st in studies} == {version}
        assert {st.scored_calibration_version for st in studies} == {"bundle-cal"}  # as scored: history kept
        assert [st.score for st in studies] != [before[st.id] for st in studies]
        events = [(e.action, e.actor, e.role, e.detail) for e in
                  s.scalars(select(AuditEvent).where(AuditEvent.actor == "ada").order_by(AuditEvent.id))]
    assert [e[0] for e in events if e[0].startswith("calibration")] == ["calibration_registered",
                                                                        "calibration_activated"]
    registered = next(e for e in events if e[0] == "calibration_registered")
    assert registered[3]["n"] == 200 and registered[3]["version"] == version and registered[2] == "admin"
    assert next(e for e in events if e[0] == "calibration_activated")[3] == {
        "version": version, "previous": original, "rescored": 200}
    # The previous calibration stays re-activatable.
    assert admin.post("/admin/calibrations/activate", data={"version": original, "csrf_token": token},
                      follow_redirects=False).status_code == 303
    with session_scope(settings.database_url) as s:
        assert calibrations.active(s).version == original
        # The study page names both calibrations and says they differ after a change.
        study = s.scalars(select(Study)).first()
        study.calibration_version = version
    page = admin.get(f"/studies/{study.id}", headers=HTML).text
    assert 'id="cal-differs"' in page and version in page and original in page


@pytest.mark.parametrize("form,message", [
    ({"window": "last", "last": "20"}, "at least 30"),
    ({"window": "range", "start": "2020-01-01", "end": "2020-01-31"}, "at least 30"),
    ({"window": "range", "start": "2020-02-01", "end": "2020-01-01"}, "after the last"),
    ({"window": "last", "last": "many"}, "whole number"),
])
def test_recalibration_refusals_show_the_reason(site, form, message):
    settings, _ = site
    admin = client_for(settings, "ada")
    r = admin.post("/admin/performance/recalibrate/preview", data={**form, "csrf_token": csrf_token(admin)})
    assert r.status_code == 422 and message in r.text and 'id="preview"' not in r.text


def test_recalibration_refuses_one_class_and_another_models_logits(site):
    settings, meta = site
    day = dt.datetime(2021, 5, 3, 10, tzinfo=dt.timezone.utc)
    with session_scope(settings.database_url) as s:
        for i in range(40):
            add_scored(s, logit=float(i % 7), finding="pneumonia", model=meta["version"], received_at=day)
            add_scored(s, logit=float(i % 5), finding="normal" if i % 2 else "pneumonia", model="another-model",
                       received_at=day + dt.timedelta(days=7))
    admin = client_for(settings, "ada")
    token = csrf_token(admin)
    one_class = admin.post("/admin/performance/recalibrate/preview",
                           data={"window": "range", "start": "2021-05-03", "end": "2021-05-03", "csrf_token": token})
    assert one_class.status_code == 422 and "same finding" in one_class.text
    other = admin.post("/admin/performance/recalibrate/preview",
                       data={"window": "range", "start": "2021-05-10", "end": "2021-05-10", "csrf_token": token})
    assert other.status_code == 422 and "cannot be reused" in other.text
