"""JSON shapes of the API."""
from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from core.worklist import Entry


class StudyOut(BaseModel):
    """A study as scripts see it; score/threshold/flagged are the displayed (active-calibration) values."""

    id: int
    source_name: str
    status: str
    section: str
    received_at: dt.datetime
    scored_at: dt.datetime | None
    waiting_seconds: float
    overdue: bool
    score: float | None
    threshold: float | None
    flagged: bool | None
    logit: float | None
    model_version: str | None
    calibration_version: str | None
    error: str | None
    duplicate_of_id: int | None
    width: int | None
    height: int | None
    finding: str | None
    outcome: str | None
    reviewer: str | None
    comment: str | None
    feedback_at: dt.datetime | None
    image_url: str | None
    heatmap_url: str | None

    @classmethod
    def from_entry(cls, entry: Entry, section: str) -> "StudyOut":
        s = entry.study
        scored = s.status == "scored"
        return cls(id=s.id, source_name=s.source_name, status=s.status, section=section, received_at=s.received_at,
                   scored_at=s.scored_at, waiting_seconds=round(entry.waiting_seconds, 3), overdue=entry.overdue,
                   score=s.score, threshold=s.threshold, flagged=s.flagged, logit=s.logit,
                   model_version=s.model_version, calibration_version=s.calibration_version, error=s.error,
                   duplicate_of_id=s.duplicate_of_id, width=s.width, height=s.height, finding=s.finding,
                   outcome=s.outcome, reviewer=s.reviewer, comment=s.finding_comment, feedback_at=s.feedback_at,
                   image_url=f"/studies/{s.id}/image" if s.status != "failed" else None,
                   heatmap_url=f"/studies/{s.id}/heatmap.png" if scored and s.heatmap_path else None)


class FeedbackIn(BaseModel):
    """A doctor's finding for a scored study; the reviewer recorded is the signed-in user or token owner."""

    finding: Literal["pneumonia", "normal"]
    comment: str | None = Field(default=None, max_length=2000)


class HealthOut(BaseModel):
    """Readiness of the service: every part must be ok for status "ok"."""

    status: Literal["ok", "unavailable"]
    db: Literal["ok", "unavailable"]
    broker: Literal["ok", "unavailable"]
    workers: int
    model_loaded: bool
    model_versions: list[str]
