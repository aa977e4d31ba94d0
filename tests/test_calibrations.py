"""The calibration service (core.calibrations) on migrated SQLite and Postgres: registration, activation with
re-scoring, threshold versions, the model check, version names, and the audit rows each change writes."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
from scipy.special import expit
from sqlalchemy import select

from core import calibrations
from core import repository as repo
from core.db import session_scope
from core.models import AuditEvent, Study

WHO = {"actor": "ada", "actor_role": "admin", "client": "10.1.2.3"}


def scored(s, logit: float, model: str = "m1", name: str = "f") -> int:
    study = repo.create_study(s, source_name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), size_bytes=1,
                              stored_path="x")
    token = repo.claim_study(s, study_id=study.id, worker="t")
    assert repo.save_score(s, study_id=study.id, token=token, logit=logit, model_version=model,
                           score=float(expit(logit)), threshold=0.5, calibration_version="base", width=1, height=1,
                           heatmap_path="h", timings={})
    return study.id


def trail(s) -> list[tuple]:
    return [(e.action, e.actor, e.role, e.client, e.detail) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_version_name_is_the_bundle_naming():
    spec = {"kind": "temperature", "params": {"temperature": 1.5}}
    blob = json.dumps({"cal": spec, "threshold": 0.3}, sort_keys=True).encode()
    assert calibrations.version_name(spec=spec, threshold=0.3) == f"temperature-{hashlib.sha256(blob).hexdigest()[:8]}"
    assert calibrations.version_name(spec=spec, threshold=0.31) != calibrations.version_name(spec=spec, threshold=0.3)


def test_register_activate_and_reactivate_with_audit(db_url):
    with session_scope(db_url) as s:
        ids = [scored(s, z, name=f"f{i}") for i, z in enumerate((-2.0, 0.4, 3.0))]
        base = calibrations.register(s, version="base", model_version="m1", kind="temperature",
                                     params={"temperature": 1.0}, threshold=0.5, source="bundle", **WHO)
        again = calibrations.register(s, version="base", model_version="m1", kind="platt", params={"a": 1, "b": 0},
                                      threshold=0.9, source="other", **WHO)
        assert again.id == base.id and again.kind == "temperature"  # an existing version is never overwritten
        calibrations.register(s, version="t2", model_version="m1", kind="temperature", params={"temperature": 2.0},
                              threshold=0.6, source="local", n=3, **WHO)
        assert calibrations.activate(s, version="base", **WHO) == 3
        assert calibrations.activate(s, version="t2", **WHO) == 3
        rows = [s.get(Study, i) for i in ids]
        assert [r.score for r in rows] == pytest.approx(list(expit([-1.0, 0.2, 1.5])))
        assert [r.flagged for r in rows] == [False, False, True] and {r.threshold for r in rows} == {0.6}
        assert [r.calibration_version for r in rows] == ["t2"] * 3
        assert [r.scored_calibration_version for r in rows] == ["base"] * 3  # history kept
        assert calibrations.activate(s, version="base", **WHO) == 3  # the previous one stays re-activatable
        assert calibrations.active(s).version == "base" and [c.version for c in calibrations.list_all(s)] == ["t2",
                                                                                                             "base"]
        with pytest.raises(calibrations.CalibrationError, match="no calibration 'nope'"):
            calibrations.activate(s, version="nope", **WHO)
        events = trail(s)
    assert [e[0] for e in events] == ["calibration_registered", "calibration_registered", "calibration_activated",
                                      "calibration_activated", "calibration_activated"]
    assert {e[1:4] for e in events} == {("ada", "admin", "10.1.2.3")}
    assert events[1][4] == {"version": "t2", "model_version": "m1", "kind": "temperature", "threshold": 0.6,
                            "source": "local", "n": 3}
    assert [e[4] for e in events[2:]] == [{"version": "base", "previous": None, "rescored": 3},
                                          {"version": "t2", "previous": "base", "rescored": 3},
                                          {"version": "base", "previous": "t2", "rescored": 3}]


def test_registration_refuses_unusable_calibrations(db_url):
    with session_scope(db_url) as s:
        for kwargs, message in (({"kind": "magic", "params": {}, "threshold": 0.5}, "unknown calibration kind"),
                                ({"kind": "temperature", "params": {}, "threshold": 0.5}, "unusable temperature"),
                                ({"kind": "temperature", "params": {"temperature": 1}, "threshold": 1.0},
                                 "strictly between 0 and 1")):
            with pytest.raises(calibrations.CalibrationError, match=message):
                calibrations.register(s, version="x", model_version="m1", source="t", **kwargs, **WHO)
        assert calibrations.list_all(s) == [] and trail(s) == []


def test_threshold_change_is_a_new_version_in_force(db_url):
    with session_scope(db_url) as s:
        with pytest.raises(calibrations.CalibrationError, match="No calibration is in force"):
            calibrations.set_threshold(s, threshold=0.3, **WHO)
        scored(s, 0.0)
        calibrations.register(s, version="base", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=0.6, source="b", **WHO)
        calibrations.activate(s, version="base", **WHO)
        old, new, n = calibrations.set_threshold(s, threshold=0.45, **WHO)
        assert (old.version, new.version, new.threshold, new.params, n) == ("base", "base@t0.4500", 0.45,
                                                                            {"temperature": 1.0}, 1)
        assert s.scalars(select(Study)).one().flagged is True  # 0.5 ≥ 0.45
        assert calibrations.set_threshold(s, threshold=0.45, **WHO)[2] == 0  # unchanged: nothing happens
        with pytest.raises(calibrations.CalibrationError, match="strictly between 0 and 1"):
            calibrations.parse_threshold("1.5")
        events = trail(s)
    assert events[-1] == ("threshold_changed", "ada", "admin", "10.1.2.3",
                          {"old": 0.6, "new": 0.45, "version": "base@t0.4500", "previous": "base", "rescored": 1})


def test_in_force_only_for_the_model_it_calibrates_and_the_bundle_check(db_url):
    meta = {"version": "m2", "threshold": 0.7,
            "calibration": {"kind": "temperature", "params": {"temperature": 3.0}, "version": "bundle-m2"}}
    with session_scope(db_url) as s:
        calibrations.register(s, version="old", model_version="m1", kind="temperature", params={"temperature": 1.0},
                              threshold=0.5, source="t", **WHO)
        calibrations.activate(s, version="old", **WHO)
        assert calibrations.in_force(s, bundle=SimpleNamespace(version="m1")).version == "old"
        # A calibration of model m1 says nothing about m2's logits: the pipeline falls back to the bundle's own.
        assert calibrations.in_force(s, bundle=SimpleNamespace(version="m2")) is None
        with pytest.raises(calibrations.CalibrationError, match="calibrates model m2, but the service runs m1"):
            calibrations.register_bundle(s, meta=meta, running_model_version="m1", source="models/local", **WHO)
        # Deploying m2: its own calibration comes into force (audited as the worker).
        cal = calibrations.ensure_bundle(s, bundle_meta=meta, source="models/m2", actor="worker:w1")
        assert (cal.version, cal.model_version, calibrations.active(s).version) == ("bundle-m2", "m2", "bundle-m2")
        assert calibrations.ensure_bundle(s, bundle_meta=meta, source="models/m2", actor="worker:w2").version == \
            "bundle-m2"
        events = trail(s)
    assert [(e[0], e[1]) for e in events[-2:]] == [("calibration_registered", "worker:w1"),
                                                    ("calibration_activated", "worker:w1")]
