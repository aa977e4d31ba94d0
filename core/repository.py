"""Repository functions over studies, calibrations and worker heartbeats (keyword-only, no commits)."""
from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.calibration import calibrator_from_dict
from core.models import Calibration, Status, Study, WorkerHeartbeat, utcnow

FINDINGS = ("pneumonia", "normal")


def create_study(session: Session, *, source_name: str, sha256: str, size_bytes: int, stored_path: str,
                 received_at: dt.datetime | None = None) -> Study:
    """Adds a study; a byte-identical copy of an earlier one is recorded as its duplicate, not queued."""
    first = session.scalars(select(Study).where(Study.sha256 == sha256, Study.duplicate_of_id.is_(None))
                            .order_by(Study.id).limit(1)).first()
    study = Study(source_name=source_name, sha256=sha256, size_bytes=size_bytes, stored_path=stored_path,
                  received_at=received_at or utcnow(), status=Status.QUEUED)
    if first is not None:
        study.status = Status.DUPLICATE
        study.duplicate_of_id = first.id
        study.error = f"byte-identical duplicate of study {first.id} ({first.source_name})"
    session.add(study)
    session.flush()
    return study


def get_study(session: Session, *, study_id: int) -> Study | None:
    """Returns a study by id."""
    return session.get(Study, study_id)


def mark_enqueued(session: Session, *, study_id: int) -> None:
    """Records that a scoring task was sent for the study."""
    session.execute(update(Study).where(Study.id == study_id)
                    .values(enqueued_at=utcnow(), enqueue_count=Study.enqueue_count + 1))


def claim_study(session: Session, *, study_id: int, worker: str) -> str | None:
    """Takes a non-terminal study for processing and returns a claim token (None if already finished).

    A later claim supersedes an earlier one (a redelivered task after a worker died), and only the
    holder of the latest token can store results, so a study is never scored twice.
    """
    token = str(uuid.uuid4())
    result = session.execute(update(Study).where(Study.id == study_id, Study.status.in_([Status.QUEUED,
                                                                                     Status.PROCESSING]))
                             .values(status=Status.PROCESSING, claim_token=token, started_at=utcnow(), worker=worker))
    return token if result.rowcount == 1 else None


def save_score(session: Session, *, study_id: int, token: str, logit: float, model_version: str, score: float,
               threshold: float, calibration_version: str, width: int, height: int, heatmap_path: str,
               timings: dict) -> bool:
    """Stores a result if the claim is still held; returns False if another claim took over."""
    flagged = bool(score >= threshold)
    result = session.execute(
        update(Study).where(Study.id == study_id, Study.claim_token == token, Study.status == Status.PROCESSING)
        .values(status=Status.SCORED, error=None, scored_at=utcnow(), logit=logit, model_version=model_version,
                scored_score=score, scored_threshold=threshold, scored_flagged=flagged,
                scored_calibration_version=calibration_version, score=score, threshold=threshold, flagged=flagged,
                calibration_version=calibration_version, width=width, height=height, heatmap_path=heatmap_path,
                timings=timings))
    return result.rowcount == 1


def mark_failed(session: Session, *, study_id: int, reason: str, token: str | None = None,
                stored_path: str | None = None) -> bool:
    """Ends a study as failed with a human-readable reason (and, when moved, its quarantine path)."""
    cond = [Study.id == study_id, Study.status.in_([Status.QUEUED, Status.PROCESSING])]
    if token is not None:
        cond.append(Study.claim_token == token)
    values = {"status": Status.FAILED, "error": reason, "scored_at": None}
    if stored_path is not None:
        values["stored_path"] = stored_path
    return session.execute(update(Study).where(*cond).values(**values)).rowcount == 1


def stale_study_ids(session: Session, *, older_than: dt.datetime) -> list[int]:
    """Returns queued/processing studies whose last enqueue is older than the cut-off (lost messages)."""
    return list(session.scalars(select(Study.id).where(
        Study.status.in_([Status.QUEUED, Status.PROCESSING]),
        or_(Study.enqueued_at.is_(None), Study.enqueued_at < older_than)).order_by(Study.id)))


def record_feedback(session: Session, *, study_id: int, finding: str, comment: str | None,
                    reviewer: str) -> Study:
    """Records the clinician's finding and derives TP/FP/TN/FN against the flag in force at scoring."""
    if finding not in FINDINGS:
        raise ValueError(f"finding must be one of {FINDINGS}")
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study {study_id} not found")
    study.finding = finding
    study.finding_comment = (comment or "").strip() or None
    study.reviewer = reviewer
    study.feedback_at = utcnow()
    if study.scored_flagged is None:
        study.outcome = None
    else:
        positive = finding == "pneumonia"
        study.outcome = ("T" if study.scored_flagged == positive else "F") + ("P" if study.scored_flagged else "N")
    return study


# --- calibrations -------------------------------------------------------------------------------


def active_calibration(session: Session) -> Calibration | None:
    """Returns the calibration in force."""
    return session.scalars(select(Calibration).where(Calibration.active.is_(True))).first()


def register_calibration(session: Session, *, version: str, model_version: str, kind: str, params: dict,
                         threshold: float, source: str) -> Calibration:
    """Adds a calibration (or returns the existing one with that version)."""
    existing = session.scalars(select(Calibration).where(Calibration.version == version)).first()
    if existing is not None:
        return existing
    cal = Calibration(version=version, model_version=model_version, kind=kind, params=params,
                      threshold=threshold, source=source, active=False)
    session.add(cal)
    session.flush()
    return cal


def activate_calibration(session: Session, *, version: str) -> int:
    """Makes a calibration active and re-scores every scored study from its stored logit; returns the count."""
    cal = session.scalars(select(Calibration).where(Calibration.version == version)).first()
    if cal is None:
        raise LookupError(f"no calibration with version {version}")
    session.execute(update(Calibration).where(Calibration.id != cal.id).values(active=False))
    cal.active = True
    cal.activated_at = utcnow()
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
    return len(studies)


def ensure_bundle_calibration(session: Session, *, bundle_meta: dict, source: str) -> Calibration:
    """Registers the bundle's own calibration and activates it when none is active (first start)."""
    spec = bundle_meta["calibration"]
    cal = register_calibration(session, version=spec["version"], model_version=bundle_meta["version"],
                               kind=spec["kind"], params=spec["params"], threshold=float(bundle_meta["threshold"]),
                               source=source)
    current = active_calibration(session)
    if current is None or current.model_version != bundle_meta["version"]:
        activate_calibration(session, version=cal.version)
    return active_calibration(session)


# --- workers --------------------------------------------------------------------------------------


def heartbeat(session: Session, *, name: str, model_version: str | None, device: str | None) -> None:
    """Records that a worker is alive with a loaded model."""
    hb = session.get(WorkerHeartbeat, name)
    if hb is None:
        session.add(WorkerHeartbeat(name=name, model_version=model_version, device=device))
    else:
        hb.model_version, hb.device, hb.last_seen = model_version, device, utcnow()
    session.flush()


def live_workers(session: Session, *, within_seconds: int) -> list[WorkerHeartbeat]:
    """Returns workers seen recently."""
    cutoff = utcnow() - dt.timedelta(seconds=within_seconds)
    return list(session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_seen >= cutoff)))
