"""Local recalibration from a feedback export, its refusals, and activating calibrations."""
import csv

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import expit

from cli import main
from core import calibrations
from core import repository as repo
from core.db import session_scope
from core.feedback import COLUMNS, feedback_csv
from core.migrate import upgrade
from core.ml.bundle import load_bundle, read_meta
from core.models import Study
from core.settings import get_settings
from training.recalibrate import RecalibrationRefused, recalibrate


def write_feedback(path, logits, labels, model_version):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for i, (z, y) in enumerate(zip(logits, labels)):
            w.writerow({"study_id": i + 1, "model_version": model_version, "logit": z, "score": expit(z),
                        "threshold": 0.5, "flagged": int(expit(z) >= 0.5),
                        "finding": "pneumonia" if y else "normal"})
    return path


def shifted_cohort(n, seed=0):
    """A hospital where the model is over-confident and the prevalence differs: p = σ(z/3 − 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(1.0, 4.0, n)
    y = (rng.random(n) < expit(z / 3 - 1)).astype(int)
    return z, y


def test_recalibration_on_a_shifted_cohort_lowers_ece(bundle_dir, tmp_path):
    version = read_meta(bundle_dir)["version"]
    z, y = shifted_cohort(300)
    out = tmp_path / "local"
    meta = recalibrate(write_feedback(tmp_path / "feedback.csv", z, y, version), bundle_dir, out)
    r = meta.extra["recalibration"]
    assert r["n"] == 300 and r["chosen"] in ("temperature", "platt", "isotonic")
    assert r["after_cross_validated"]["ece"] < r["before"]["ece"] / 2
    assert r["after_cross_validated"]["sensitivity"] >= 0.8
    assert meta.version == version  # same weights, same model version
    assert meta.calibration["version"] != read_meta(bundle_dir)["calibration"]["version"]
    assert (out / "model.safetensors").read_bytes() == (bundle_dir / "model.safetensors").read_bytes()
    assert (out / "report" / "README.md").exists() and (out / "report" / "reliability.png").exists()
    new = load_bundle(out)
    assert new.threshold == pytest.approx(meta.threshold)


@pytest.mark.parametrize("n,single_class,other_model,message", [
    (29, False, False, "at least 30"),
    (60, True, False, "same finding"),
    (60, False, True, "cannot be reused"),
])
def test_recalibration_refuses_unusable_cohorts(bundle_dir, tmp_path, n, single_class, other_model, message):
    z, y = shifted_cohort(n, seed=1)
    if single_class:
        y[:] = 1
    version = "another-model" if other_model else read_meta(bundle_dir)["version"]
    path = write_feedback(tmp_path / "f.csv", z, y, version)
    with pytest.raises(RecalibrationRefused, match=message):
        recalibrate(path, bundle_dir, tmp_path / "out")
    result = CliRunner().invoke(main, ["recalibrate", str(path), "--model", str(bundle_dir), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code != 0 and "recalibration refused" in result.output and message in result.output
    assert not (tmp_path / "out" / "bundle.json").exists()


def test_recalibration_warns_below_100_cases(bundle_dir, tmp_path):
    z, y = shifted_cohort(60, seed=2)
    path = write_feedback(tmp_path / "f.csv", z, y, read_meta(bundle_dir)["version"])
    with pytest.warns(UserWarning, match="only 60 reviewed cases"):
        recalibrate(path, bundle_dir, tmp_path / "out")


def test_activate_rescored_studies_and_reactivate_previous(bundle_dir, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setenv("CHESTAID_DATABASE_URL", db)
    monkeypatch.setenv("CHESTAID_MODEL_DIR", str(bundle_dir))
    monkeypatch.setenv("CHESTAID_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    upgrade(db)
    meta = read_meta(bundle_dir)
    logits = [-3.0, 0.5, 2.0]
    with session_scope(db) as s:
        original = calibrations.ensure_bundle(s, bundle_meta=meta, source=str(bundle_dir), actor="test").version
        for i, z in enumerate(logits):
            st = repo.create_study(s, source_name=f"f{i}.png", sha256=f"{i:064d}", size_bytes=1, stored_path="x")
            token = repo.claim_study(s, study_id=st.id, worker="t")
            repo.save_score(s, study_id=st.id, token=token, logit=z, model_version=meta["version"],
                            score=float(expit(z)), threshold=0.5, calibration_version=original, width=1, height=1,
                            heatmap_path="h", timings={})
            repo.record_feedback(s, study_id=st.id, finding="pneumonia" if z > 0 else "normal", comment=None,
                                 reviewer="dr")
    rng_z, rng_y = shifted_cohort(200, seed=3)
    local = tmp_path / "local"
    recalibrate(write_feedback(tmp_path / "f.csv", rng_z, rng_y, meta["version"]), bundle_dir, local)
    new_meta = read_meta(local)

    runner = CliRunner()
    result = runner.invoke(main, ["calibration", "activate", str(local)])
    assert result.exit_code == 0, result.output
    assert "3 studies re-scored" in result.output
    from core.ml.calibration import calibrator_from_dict
    expected = calibrator_from_dict(new_meta["calibration"]).predict(logits)
    with session_scope(db) as s:
        rows = s.query(Study).order_by(Study.id).all()
        assert [r.calibration_version for r in rows] == [new_meta["calibration"]["version"]] * 3
        np.testing.assert_allclose([r.score for r in rows], expected, atol=1e-12)
        assert [r.flagged for r in rows] == [bool(e >= new_meta["threshold"]) for e in expected]
        assert [r.scored_calibration_version for r in rows] == [original] * 3  # history kept
        export = list(csv.DictReader(feedback_csv(s, salt=b"test salt").splitlines()))
        assert [float(r["logit"]) for r in export] == logits
        # Patients appear only as the salted pseudonymous key (empty for these non-DICOM films).
        assert [k for k in export[0] if "patient" in k] == ["patient_key"]
        assert [r["patient_key"] for r in export] == [""] * 3

    from core.models import AuditEvent
    with session_scope(db) as s:
        events = s.query(AuditEvent).filter_by(action="calibration_activated").all()
        # The bundle's own calibration came into force on first start (audited too), then the CLI's.
        assert [(e.detail["version"], e.detail["previous"], e.detail["rescored"]) for e in events] == [
            (original, None, 0), (new_meta["calibration"]["version"], original, 3)]
        assert events[0].actor == "test" and events[1].actor.startswith("cli:")

    listing = runner.invoke(main, ["calibration", "list"])
    assert f"* {new_meta['calibration']['version']}" in listing.output
    back = runner.invoke(main, ["calibration", "activate", "--version", original])
    assert back.exit_code == 0, back.output
    with session_scope(db) as s:
        rows = s.query(Study).order_by(Study.id).all()
        np.testing.assert_allclose([r.score for r in rows], expit(np.array(logits)), atol=1e-12)  # T = 1
    get_settings.cache_clear()
