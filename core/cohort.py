"""The reviewed cases a local recalibration is fitted on: the latest N, or those received in a date range."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Study
from core.repository import LABELS

MAX_CASES = 20_000  # bounds one fit's work; far above the 100-300 cases a recalibration needs


@dataclass(frozen=True)
class Window:
    """Which reviewed cases: the `last` ones by feedback time, or those received from `start` to `end`
    (whole UTC days, both included)."""

    last: int | None = None
    start: dt.date | None = None
    end: dt.date | None = None

    def describe(self) -> str:
        if self.last is not None:
            return f"the last {self.last} reviewed cases"
        return f"reviewed cases received {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}"


@dataclass(frozen=True)
class Cohort:
    """Logits, findings (1 = pneumonia) and the model versions that produced the logits."""

    logits: np.ndarray
    labels: np.ndarray
    model_versions: frozenset[str]


def reviewed(session: Session, *, window: Window) -> Cohort:
    """Returns the reviewed, scored images in the window (one per image, as feedback.csv has them)."""
    # Only pneumonia/normal findings are labels; "other abnormality", "indeterminate", "poor quality" are not.
    query = select(Study.logit, Study.finding, Study.model_version).where(Study.finding.in_(LABELS),
                                                                        Study.logit.is_not(None))
    if window.last is not None:
        query = query.order_by(Study.feedback_at.desc(), Study.id.desc()).limit(min(window.last, MAX_CASES))
    else:
        start = dt.datetime.combine(window.start, dt.time(), tzinfo=dt.timezone.utc)
        end = dt.datetime.combine(window.end + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)
        query = query.where(Study.received_at >= start, Study.received_at < end).order_by(Study.id).limit(MAX_CASES)
    rows = session.execute(query).all()
    return Cohort(np.array([r[0] for r in rows], float), np.array([int(r[1] == "pneumonia") for r in rows], int),
                  frozenset(r[2] or "" for r in rows))
