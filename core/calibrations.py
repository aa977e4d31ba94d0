"""The calibration service: list, register, activate, set the threshold, what is in force, the bundle check
and version naming. The admin pages, the CLI, the worker and the pipeline all go through here.

Keyword-only functions, no commits. Every change writes its audit row in the same transaction (as core.auth
does), so no calibration comes into force untraced.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Protocol

from sqlalchemy import and_, case, false, func, select, true, update
from sqlalchemy.orm import Session

from core import audit, worklist_rows
from core.ml.calibration import CALIBRATORS, calibrator_from_dict
from core.models import Calibration, Status, Study, WorklistRow, utcnow
from core.worklist_sections import UNREAD

THRESHOLD_MARK = "@t"  # versions made by a threshold change: "<base>@t0.3500"
_VERSION_MAX = Calibration.__table__.c.version.type.length


class CalibrationError(ValueError):
    """Raised with a reason a person can act on: unknown version, wrong model, unusable threshold or parameters."""


class HasVersion(Protocol):
    """Anything that names a model version (a loaded core.ml.bundle.Bundle); keeps torch out of this module."""

    @property
    def version(self) -> str: ...


def version_name(*, spec: dict, threshold: float) -> str:
    """Names a calibration by its kind and a hash of its parameters and threshold (same fit → same name)."""
    blob = json.dumps({"cal": {"kind": spec["kind"], "params": spec.get("params", {})}, "threshold": threshold},
                      sort_keys=True).encode()
    return f"{spec['kind']}-{hashlib.sha256(blob).hexdigest()[:8]}"


def list_all(session: Session) -> list[Calibration]:
    """Returns every registered calibration, newest first."""
    return list(session.scalars(select(Calibration).order_by(Calibration.id.desc())))


def get(session: Session, *, version: str) -> Calibration | None:
    """Returns the calibration with this version, or None."""
    return session.scalars(select(Calibration).where(Calibration.version == version)).first()


def active(session: Session) -> Calibration | None:
    """Returns the calibration marked active (what the worklist shows), whatever model it calibrates."""
    return session.scalars(select(Calibration).where(Calibration.active.is_(True))).first()


def in_force(session: Session, *, bundle: HasVersion) -> Calibration | None:
    """Returns the active calibration if it calibrates this bundle's model, else None: then the bundle's own
    calibration applies, because a calibration fitted on another model's logits means nothing for this one."""
    cal = active(session)
    return cal if cal is not None and cal.model_version == bundle.version else None


def _check_spec(kind: str, params: dict, threshold: float) -> None:
    if kind not in CALIBRATORS:
        raise CalibrationError(f"unknown calibration kind {kind!r} (known: {', '.join(sorted(CALIBRATORS))})")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 < threshold < 1.0):
        raise CalibrationError(f"threshold must be a risk score strictly between 0 and 1, got {threshold!r}")
    try:
        calibrator_from_dict({"kind": kind, "params": params}).predict([0.0])
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"unusable {kind} parameters: {exc!r}") from exc


def _add(session: Session, *, version: str, model_version: str, kind: str, params: dict, threshold: float,
         source: str) -> tuple[Calibration, bool]:
    """Adds a calibration unless its version exists; returns (row, created)."""
    existing = get(session, version=version)
    if existing is not None:
        return existing, False
    _check_spec(kind, params, threshold)
    cal = Calibration(version=version[:_VERSION_MAX], model_version=model_version, kind=kind, params=params,
                      threshold=float(threshold), source=source[:1024], active=False)
    session.add(cal)
    session.flush()
    return cal, True


def register(session: Session, *, version: str, model_version: str, kind: str, params: dict, threshold: float,
             source: str, actor: str, actor_role: str | None = None, client: str | None = None,
             **detail) -> Calibration:
    """Registers a calibration (not yet in force) and audits it; an existing version is returned unchanged.
    `detail` (e.g. the cohort it was fitted on) goes into the audit row."""
    cal, created = _add(session, version=version, model_version=model_version, kind=kind, params=params,
                        threshold=threshold, source=source)
    if created:
        audit.record(session, actor=actor, role=actor_role, client=client, action=audit.CALIBRATION_REGISTERED,
                     version=cal.version, model_version=model_version, kind=kind, threshold=cal.threshold,
                     source=cal.source, **detail)
    return cal


def check_bundle(*, meta: dict, running_model_version: str, where: str) -> None:
    """The bundle check: refuses a calibration bundle made for another model than the one the service runs."""
    if meta.get("version") != running_model_version:
        raise CalibrationError(f"{where} calibrates model {meta.get('version')}, but the service runs "
                               f"{running_model_version}; logits of another model cannot be reused")


def register_bundle(session: Session, *, meta: dict, running_model_version: str, source: str, actor: str,
                    actor_role: str | None = None, client: str | None = None) -> Calibration:
    """Registers a bundle's calibration after the bundle check (e.g. one written by `chestaid recalibrate`)."""
    check_bundle(meta=meta, running_model_version=running_model_version, where=source)
    spec = meta["calibration"]
    return register(session, version=spec["version"], model_version=meta["version"], kind=spec["kind"],
                    params=spec.get("params", {}), threshold=float(meta["threshold"]), source=source, actor=actor,
                    actor_role=actor_role, client=client)


def _rescore(session: Session, cal: Calibration) -> int:
    """Re-derives score, threshold and flag of every scored study from its stored logit; returns the count."""
    calibrator = calibrator_from_dict({"kind": cal.kind, "params": cal.params})
    studies = session.scalars(select(Study).where(Study.logit.is_not(None))).all()
    if studies:
        scores = calibrator.predict([s.logit for s in studies])
        for study, score in zip(studies, scores):
            study.score = float(score)
            study.threshold = cal.threshold
            study.flagged = bool(score >= cal.threshold)
            study.calibration_version = cal.version
    session.flush()
    worklist_rows.rebuild(session)  # every risk and flag may have changed, so every worklist row's place
    return len(studies)


def _put_in_force(session: Session, cal: Calibration) -> int:
    session.execute(update(Calibration).where(Calibration.id != cal.id).values(active=False))
    cal.active = True
    cal.activated_at = utcnow()
    return _rescore(session, cal)


def activate(session: Session, *, version: str, actor: str, actor_role: str | None = None,
             client: str | None = None) -> int:
    """Puts a registered calibration in force, re-scores every scored study from its stored logit, audits it,
    and returns how many studies were re-scored. The previous one stays registered and re-activatable."""
    cal = get(session, version=version)
    if cal is None:
        raise CalibrationError(f"there is no calibration {version!r}")
    previous = active(session)
    rescored = _put_in_force(session, cal)
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.CALIBRATION_ACTIVATED,
                 version=cal.version, previous=previous.version if previous else None, rescored=rescored)
    return rescored


def parse_threshold(text: str) -> float:
    """Reads a threshold typed by a person; raises CalibrationError unless it is strictly between 0 and 1."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (0.0 < value < 1.0):
        raise CalibrationError("The threshold is a risk score strictly between 0 and 1, e.g. 0.35.")
    return value


def _threshold_version(session: Session, base: Calibration, threshold: float) -> Calibration:
    """Registers (or reuses) a calibration like `base` with another threshold; history is kept."""
    stem = base.version.split(THRESHOLD_MARK)[0][:100]
    name, n = f"{stem}{THRESHOLD_MARK}{threshold:.4f}", 1
    while True:
        existing = get(session, version=name)
        if existing is None:
            return _add(session, version=name, model_version=base.model_version, kind=base.kind, params=base.params,
                        threshold=threshold, source=f"threshold set on the admin page from {base.version}")[0]
        if (existing.kind, existing.params, existing.model_version, existing.threshold) == (
                base.kind, base.params, base.model_version, threshold):
            return existing
        n += 1
        name = f"{stem}{THRESHOLD_MARK}{threshold:.4f}-{n}"


def set_threshold(session: Session, *, threshold: float, actor: str, actor_role: str | None = None,
                  client: str | None = None) -> tuple[Calibration, Calibration, int]:
    """Sets a new threshold for the calibration in force, saved as a new calibration version put in force
    (one threshold_changed audit row names both). Returns (previous, new, studies re-scored)."""
    current = active(session)
    if current is None:
        raise CalibrationError("No calibration is in force yet, so there is no threshold to change.")
    parse_threshold(str(threshold))
    if threshold == current.threshold:
        return current, current, 0
    cal = _threshold_version(session, current, threshold)
    rescored = _put_in_force(session, cal)
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.THRESHOLD_CHANGED,
                 old=current.threshold, new=threshold, version=cal.version, previous=current.version,
                 rescored=rescored)
    return current, cal, rescored


def threshold_preview(session: Session, *, threshold: float) -> dict:
    """What setting `threshold` would change, before it is set (scores stay: only the flag moves): unread
    worklist rows that would become flagged or unflagged, and the sensitivity/specificity the new and the
    current threshold imply on the recorded pneumonia/normal findings (None without such findings)."""
    current = active(session)
    cut = -threshold  # rows store the risk negated
    rows = dict(session.execute(
        select(WorklistRow.flagged, func.count()).where(
            WorklistRow.section == UNREAD,
            ((WorklistRow.flagged == false()) & (WorklistRow.neg_score <= cut))
            | ((WorklistRow.flagged == true()) & (WorklistRow.neg_score > cut)))
        .group_by(WorklistRow.flagged)).all())

    def rates(t: float) -> tuple[float | None, float | None, int, int]:
        labelled = and_(Study.status == Status.SCORED, Study.finding.in_(("pneumonia", "normal")))
        pos, neg, tp, tn = session.execute(select(
            func.count().filter(Study.finding == "pneumonia"), func.count().filter(Study.finding == "normal"),
            func.sum(case(((Study.finding == "pneumonia") & (Study.score >= t), 1), else_=0)),
            func.sum(case(((Study.finding == "normal") & (Study.score < t), 1), else_=0))).where(labelled)).one()
        return (tp / pos if pos else None), (tn / neg if neg else None), pos, neg

    sens, spec, positives, negatives = rates(threshold)
    old_sens, old_spec = rates(current.threshold)[:2] if current else (None, None)
    return {"threshold": threshold, "current": current.threshold if current else None,
            "newly_flagged": rows.get(False, 0), "unflagged": rows.get(True, 0),
            "sensitivity": sens, "specificity": spec, "current_sensitivity": old_sens,
            "current_specificity": old_spec, "positives": positives, "negatives": negatives}


def ensure_bundle(session: Session, *, bundle_meta: dict, source: str, actor: str) -> Calibration:
    """Registers the bundle's own calibration and puts it in force when none is, or when the one in force
    calibrates another model (first start, or a new model deployed)."""
    cal = register_bundle(session, meta=bundle_meta, running_model_version=bundle_meta["version"], source=source,
                          actor=actor)
    current = active(session)
    if current is None or current.model_version != bundle_meta["version"]:
        activate(session, version=cal.version, actor=actor)
    return active(session)
