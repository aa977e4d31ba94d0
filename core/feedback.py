"""The feedback export: one row per reviewed study, the exact input of `chestaid recalibrate`."""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.csvsafe import safe_cell
from core.models import Study
from core.pseudonym import patient_key
from core.repository import LABELS, OTHER_FINDINGS

# patient_key is last so earlier readers of the format keep working. No patient ID, name or accession
# number is ever exported: patient_key (see core.pseudonym) lets one patient's films be linked, nothing more.
COLUMNS = ["study_id", "received_at", "scored_at", "feedback_at", "model_version", "calibration_version", "logit",
           "score", "threshold", "flagged", "finding", "outcome", "reviewer", "comment", "patient_key"]


class FeedbackFormatError(ValueError):
    """Raised when a feedback CSV cannot be used."""


def _iso(value) -> str:
    return value.isoformat() if value is not None else ""


def feedback_rows(session: Session, *, salt: bytes) -> Iterable[dict]:
    """Yields export rows for every scored study with a recorded finding, oldest feedback first.

    Score, threshold, flag and calibration are the ones in force when the study was scored,
    so the outcome column (TP/FP/TN/FN) can be checked against them. A DICOM study's finding is recorded on
    each of its scored images, so each image is one row with its own logit. The salt is the configured one
    (core.pseudonym.load_salt), passed in by the caller. Numbers stay numbers; every text cell is made
    spreadsheet-safe (core.csvsafe), since reviewers' comments are free text.
    """
    studies = session.scalars(select(Study).where(Study.finding.is_not(None), Study.logit.is_not(None))
                              .order_by(Study.feedback_at, Study.id))
    for s in studies:
        row = {"study_id": s.id, "received_at": _iso(s.received_at), "scored_at": _iso(s.scored_at),
               "feedback_at": _iso(s.feedback_at), "model_version": s.model_version,
               "calibration_version": s.scored_calibration_version, "logit": float(s.logit),
               "score": float(s.scored_score), "threshold": float(s.scored_threshold),
               "flagged": int(bool(s.scored_flagged)), "finding": s.finding, "outcome": s.outcome,
               "reviewer": s.reviewer, "comment": s.finding_comment,
               "patient_key": patient_key(salt, s.patient_id) if s.patient_id else ""}
        yield {column: safe_cell(value) for column, value in row.items()}


def feedback_csv(session: Session, *, salt: bytes) -> str:
    """Returns the whole export as CSV text (floats written in full precision, as repr does)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(feedback_rows(session, salt=salt))
    return buf.getvalue()


def read_feedback_csv(path: Path, *, excluded: dict[str, int] | None = None) -> tuple[list[float], list[int], set[str]]:
    """Reads (logits, labels 1=pneumonia, model versions) from an export, refusing malformed files. Rows with
    a finding that is not a label ("other abnormality", "indeterminate", "poor quality") are left out of the
    recalibration input and counted per finding into `excluded` when given."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"logit", "finding", "model_version"} - set(reader.fieldnames or [])
        if missing:
            raise FeedbackFormatError(f"{path} is not a Chest-Aid feedback export: missing columns {sorted(missing)}")
        logits, labels, versions = [], [], set()
        for n, row in enumerate(reader, start=2):
            if row["finding"] in OTHER_FINDINGS:
                if excluded is not None:
                    excluded[row["finding"]] = excluded.get(row["finding"], 0) + 1
                continue
            if row["finding"] not in LABELS:
                known = ", ".join(LABELS + OTHER_FINDINGS)
                raise FeedbackFormatError(f"{path} line {n}: finding must be one of {known}, got {row['finding']!r}")
            try:
                logits.append(float(row["logit"]))
            except ValueError:
                raise FeedbackFormatError(f"{path} line {n}: logit {row['logit']!r} is not a number") from None
            labels.append(1 if row["finding"] == "pneumonia" else 0)
            versions.add(row["model_version"])
    return logits, labels, versions
