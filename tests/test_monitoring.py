"""Local performance monitoring (core.monitoring) on migrated SQLite and Postgres: weekly metrics against a
hand-computed cohort with Wilson bounds, PSI/KS against scipy, and each alert firing and not firing."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import entropy, ks_2samp

from core import calibrations, monitoring
from core import repository as repo
from core.db import session_scope
from core.models import Study, utcnow
from core.settings import Settings

MONDAY = dt.datetime(2025, 3, 3, 9, 0, tzinfo=dt.timezone.utc)  # a Monday
META = {"version": "m1", "threshold": 0.5, "target_sensitivity": 0.9,
        "calibration": {"kind": "temperature", "params": {"temperature": 1.0}, "version": "bundle-cal"}}


def add_scored(s, *, logit: float, finding: str | None, received_at: dt.datetime, threshold: float = 0.5,
               model: str = "m1", n: list = [0]) -> Study:  # noqa: B006 (a counter for unique names)
    n[0] += 1
    name = f"film{n[0]}"
    study = repo.create_study(s, source_name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), size_bytes=1,
                              stored_path="x", received_at=received_at)
    token = repo.claim_study(s, study_id=study.id, worker="t")
    assert repo.save_score(s, study_id=study.id, token=token, logit=logit, model_version=model,
                           score=float(expit(logit)), threshold=threshold, calibration_version="bundle-cal",
                           width=1, height=1, heatmap_path="h", timings={})
    s.expire(study)  # save_score is a bulk UPDATE: reload the row, as the next request would
    if finding:
        repo.record_feedback(s, study_id=study.id, finding=finding, comment=None, reviewer="dr")
    return study


def test_wilson_interval_by_hand():
    # 8/10: p = 0.8, z = 1.96: centre (0.8 + z²/20)/(1 + z²/10) = 0.7168, half-width 0.2266.
    assert monitoring.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert monitoring.wilson(0, 5) == pytest.approx((0.0, 0.4345), abs=1e-4)
    assert monitoring.wilson(5, 5)[1] == 1.0 and np.isnan(monitoring.wilson(0, 0)[0])


def test_weekly_metrics_against_a_hand_computed_cohort(db_url):
    # Week 1: flagged (logit 2 ≥ threshold): 3 pneumonia (TP), 1 normal (FP); not flagged: 1 pneumonia (FN),
    # 4 normal (TN), 2 without a finding. Week 2: 1 TP, 1 TN.
    week1 = [(2.0, "pneumonia")] * 3 + [(2.0, "normal")] + [(-2.0, "pneumonia")] + [(-2.0, "normal")] * 4 + \
        [(-2.0, None)] * 2
    week2 = [(2.0, "pneumonia"), (-2.0, "normal")]
    with session_scope(db_url) as s:
        for i, (z, f) in enumerate(week1):
            add_scored(s, logit=z, finding=f, received_at=MONDAY + dt.timedelta(days=i % 7, hours=1))
        for z, f in week2:
            add_scored(s, logit=z, finding=f, received_at=MONDAY + dt.timedelta(days=8))
        repo.create_study(s, source_name="queued", sha256="q" * 64, size_bytes=1, stored_path="q")  # not scored
        weeks, overall = monitoring.weekly(s)
    assert [w.start for w in weeks] == [dt.date(2025, 3, 10), dt.date(2025, 3, 3)]
    w1 = weeks[1]
    assert (w1.scored, w1.reviewed, w1.tp, w1.fp, w1.tn, w1.fn) == (11, 9, 3, 1, 4, 1)
    assert (w1.sensitivity.k, w1.sensitivity.n, w1.specificity.k, w1.specificity.n) == (3, 4, 4, 5)
    assert (w1.ppv.value, w1.npv.value, w1.coverage.value) == (0.75, 0.8, 9 / 11)
    # Wilson 95 % for 3/4 and 4/5, by hand: (0.3006, 0.9544) and (0.3755, 0.9638).
    assert (w1.sensitivity.low, w1.sensitivity.high) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert (w1.specificity.low, w1.specificity.high) == pytest.approx((0.3755, 0.9638), abs=1e-4)
    assert (overall.scored, overall.tp, overall.fp, overall.tn, overall.fn) == (13, 4, 1, 5, 1)
    assert (overall.sensitivity.value, overall.specificity.value) == (0.8, 5 / 6)


def test_psi_and_ks_against_scipy_on_shifted_scores():
    rng = np.random.default_rng(0)
    ref = rng.normal(0.0, 3.0, 4000)
    reference = monitoring.score_histogram(ref)
    assert sum(reference["counts"]) == reference["n"] == 4000
    same = monitoring.drift(reference, rng.normal(0.0, 3.0, 2000))
    shifted = monitoring.drift(reference, cur := rng.normal(2.0, 3.0, 2000))
    # KS: scipy's two-sample statistic on the binned values exactly, and close to it on the raw values.
    centres = (np.array(reference["edges"][:-1]) + np.array(reference["edges"][1:])) / 2
    binned = centres[np.clip(np.digitize(cur, reference["edges"]) - 1, 0, len(centres) - 1)]
    assert shifted.ks == pytest.approx(ks_2samp(np.repeat(centres, reference["counts"]), binned).statistic, abs=1e-12)
    assert shifted.ks == pytest.approx(ks_2samp(ref, cur).statistic, abs=0.03)
    # PSI is the symmetrised Kullback-Leibler divergence of the bin shares (scipy's entropy), here on deciles.
    edges = np.quantile(ref, np.linspace(0, 1, 11))
    e = np.histogram(np.clip(ref, edges[0], edges[-1]), edges)[0]
    a = np.histogram(np.clip(cur, edges[0], edges[-1]), edges)[0]
    assert monitoring.psi(e, a) == pytest.approx(entropy(a / a.sum(), e / e.sum()) + entropy(e / e.sum(), a / a.sum()))
    assert shifted.psi == pytest.approx(monitoring.psi(e, a), abs=0.03)
    assert same.psi < 0.05 < 0.25 < shifted.psi and same.ks < 0.05 < shifted.ks
    # An empty bin counts as a share of PSI_EPSILON instead of making PSI infinite.
    assert monitoring.psi([50, 50], [100, 0]) == pytest.approx((1 - 0.5) * np.log(1 / 0.5) +
                                                               (1e-4 - 0.5) * np.log(1e-4 / 0.5))


def settings_for(tmp_path, **overrides) -> Settings:
    return Settings(data_dir=tmp_path / "data", inbox=tmp_path / "inbox", **overrides)


def seed_cohort(db_url, *, n: int, logit_shift: float = 0.0, miscalibrated: bool = False, seed: int = 0,
                threshold_in_force: float = 0.5, spread: float = 3.0):
    """n reviewed cases of model m1 scored this week; findings drawn from σ(z) (calibrated) or σ(z/3 − 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(logit_shift, spread, n)
    p = expit(z / 3 - 1) if miscalibrated else expit(z)
    y = rng.random(n) < p
    with session_scope(db_url) as s:
        calibrations.register(s, version="local", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=threshold_in_force, source="t", actor="test")
        calibrations.activate(s, version="local", actor="test")
        for zi, yi in zip(z, y):
            add_scored(s, logit=float(zi), finding="pneumonia" if yi else "normal",
                       received_at=utcnow() - dt.timedelta(hours=1))


def alerts(db_url, tmp_path, reference_logits=None, **overrides):
    meta = {**META, "reference_scores": monitoring.score_histogram(
        reference_logits if reference_logits is not None else np.random.default_rng(9).normal(0.0, 3.0, 2000))}
    with session_scope(db_url) as s:
        snap = monitoring.snapshot(s, meta=meta, settings=settings_for(tmp_path, **overrides))
    return snap, {a.kind for a in snap.alerts}


def test_no_alert_for_a_well_calibrated_sensitive_stable_model(db_url, tmp_path):
    # Exactly calibrated by construction: at each logit the share of pneumonia is σ(logit) (rounded to whole
    # cases). Random labels would not do: 15-bin ECE on 300 cases has a sampling noise of about 0.05 itself.
    levels = [-4.0, -2.0, 0.0, 2.0, 4.0]
    with session_scope(db_url) as s:
        calibrations.register(s, version="local", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=0.05, source="t", actor="test")
        calibrations.activate(s, version="local", actor="test")
        for z in levels:
            positives = round(60 * expit(z))
            for i in range(60):
                add_scored(s, logit=z, finding="pneumonia" if i < positives else "normal",
                           received_at=utcnow() - dt.timedelta(hours=1))
    snap, kinds = alerts(db_url, tmp_path, reference_logits=np.repeat(levels, 60))
    assert snap.n_cases == 300 and snap.ece < 0.01 and snap.sensitivity.low > 0.9 and snap.drift.psi < 0.01
    assert (snap.sensitivity.k, snap.sensitivity.n) == (149, 150)  # the one pneumonia at logit −4 is missed
    assert kinds == set()


def test_ece_alert_fires_with_enough_cases_only(db_url, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(monitoring, "_logged", set())  # each alert is logged once per process
    seed_cohort(db_url, n=150, miscalibrated=True, threshold_in_force=0.01)
    with caplog.at_level(logging.WARNING, logger="chestaid.monitoring"):
        snap, kinds = alerts(db_url, tmp_path)
    assert snap.ece > 0.05 and "ece" in kinds
    assert any("monitoring alert (ece)" in r.getMessage() and "Recalibrate" in r.getMessage() for r in caplog.records)
    # Below monitor_min_cases nothing fires, however bad it looks.
    snap, kinds = alerts(db_url, tmp_path, monitor_min_cases=151)
    assert snap.ece > 0.05 and "ece" not in kinds and "sensitivity" not in kinds


def test_sensitivity_alert_on_the_lower_wilson_bound(db_url, tmp_path):
    seed_cohort(db_url, n=200, threshold_in_force=0.6)
    snap, kinds = alerts(db_url, tmp_path)
    assert snap.sensitivity.low < 0.9 and "sensitivity" in kinds
    message = next(a for a in snap.alerts if a.kind == "sensitivity")
    assert "below the target 0.9" in message.message and "threshold" in message.action
    snap, kinds = alerts(db_url, tmp_path, monitor_min_cases=201)
    assert "sensitivity" not in kinds


def test_drift_alert_on_psi(db_url, tmp_path):
    seed_cohort(db_url, n=200, logit_shift=3.0, threshold_in_force=0.05)
    snap, kinds = alerts(db_url, tmp_path)
    assert snap.drift.n == 200 and snap.drift.psi > 0.25 and "drift" in kinds
    # Against a reference that looks like the recent scores, no drift.
    snap, kinds = alerts(db_url, tmp_path, reference_logits=np.random.default_rng(5).normal(3.0, 3.0, 2000))
    assert snap.drift.psi < 0.25 and "drift" not in kinds
    # Scores older than the drift window do not count.
    snap, _ = alerts(db_url, tmp_path, monitor_drift_days=0)
    assert snap.drift is None


def test_shipped_bundle_carries_its_reference_histogram():
    meta = monitoring.read_bundle_meta(Settings().model_dir)
    ref = meta["reference_scores"]
    assert ref["edges"] == monitoring.REFERENCE_EDGES and ref["n"] == sum(ref["counts"])
    assert ref["n"] == meta["split"]["counts"]["report"] == meta["metrics"]["report_half"]["n"]
