"""JSON shapes of the API."""
from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from core.models import Study
from core.worklist import Entry, section_of
from web.links import film_url, heatmap_url


class ImageOut(BaseModel):
    """One image of a DICOM study (or the film itself, for a PNG/JPEG study)."""

    id: int
    status: str
    section: str
    score: float | None
    flagged: bool | None
    error: str | None
    modality: str | None
    view_position: str | None
    sop_instance_uid: str | None
    study_url: str
    image_url: str | None
    heatmap_url: str | None

    @classmethod
    def from_study(cls, s: Study) -> "ImageOut":
        return cls(id=s.id, status=s.status, section=section_of(s), score=s.score, flagged=s.flagged, error=s.error,
                   modality=s.modality, view_position=s.view_position, sop_instance_uid=s.sop_instance_uid,
                   study_url=f"/studies/{s.id}", image_url=film_url(s), heatmap_url=heatmap_url(s))


class StudyOut(BaseModel):
    """A study as scripts see it; score/threshold/flagged are the displayed (active-calibration) values.

    A DICOM study is one worklist row led by its highest-scoring image (whose score is the row's risk);
    `images` lists every image of that DICOM study. Patient names are not served here; only the study page
    shows them.
    """

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
    accession_number: str | None
    patient_id: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    modality: str | None
    body_part_examined: str | None
    view_position: str | None
    study_date: str | None
    study_time: str | None
    images: list[ImageOut]

    @classmethod
    def from_entry(cls, entry: Entry, section: str, images: list[Study] | None = None) -> "StudyOut":
        s = entry.study
        return cls(id=s.id, source_name=s.source_name, status=s.status, section=section, received_at=s.received_at,
                   scored_at=s.scored_at, waiting_seconds=round(entry.waiting_seconds, 3), overdue=entry.overdue,
                   score=s.score, threshold=s.threshold, flagged=s.flagged, logit=s.logit,
                   model_version=s.model_version, calibration_version=s.calibration_version, error=s.error,
                   duplicate_of_id=s.duplicate_of_id, width=s.width, height=s.height, finding=s.finding,
                   outcome=s.outcome, reviewer=s.reviewer, comment=s.finding_comment, feedback_at=s.feedback_at,
                   image_url=film_url(s), heatmap_url=heatmap_url(s), accession_number=s.accession_number,
                   patient_id=s.patient_id, study_instance_uid=s.study_instance_uid,
                   series_instance_uid=s.series_instance_uid, sop_instance_uid=s.sop_instance_uid,
                   modality=s.modality, body_part_examined=s.body_part_examined, view_position=s.view_position,
                   study_date=s.study_date, study_time=s.study_time,
                   images=[ImageOut.from_study(i) for i in (images if images is not None else entry.images)])


class FeedbackIn(BaseModel):
    """A doctor's finding for a scored study; the reviewer recorded is the signed-in user or token owner."""

    finding: Literal["pneumonia", "normal", "other abnormality", "indeterminate", "poor quality"]
    comment: str | None = Field(default=None, max_length=2000)


class HealthOut(BaseModel):
    """Readiness of the service: every part must be ok for status "ok"."""

    status: Literal["ok", "unavailable"]
    # The parts below are sent to signed-in admins only; the public answer is the status alone.
    db: Literal["ok", "unavailable"] | None = None
    broker: Literal["ok", "unavailable"] | None = None
    workers: int | None = None
    model_loaded: bool | None = None
    model_versions: list[str] | None = None
    worker_devices: list[dict] | None = None
