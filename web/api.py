"""JSON API: the worklist data for scripts and tests, feedback, the feedback export and health."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse, Response

from core import repository as repo
from core import worklist as wl
from core.feedback import feedback_csv
from core.models import Status, utcnow
from web import health as health_checks
from web.deps import SessionDep, SettingsDep, StudyDep
from web.schemas import FeedbackIn, HealthOut, StudyOut

router = APIRouter()

SectionName = Literal["unread", "in_progress", "failed", "duplicates", "read"]


@router.get("/api/studies", response_model=list[StudyOut], tags=["studies"])
def list_studies(session: SessionDep, settings: SettingsDep,
                 section: SectionName | None = Query(default=None, description="one section only"),
                 limit: int | None = Query(default=None, ge=1, description="at most this many per section")
                 ) -> list[StudyOut]:
    """Lists studies in worklist order: unread by priority, then in progress, failed, duplicates, read."""
    names = [section] if section else list(wl.SECTIONS)
    now = utcnow()
    out = []
    for name in names:
        for entry in wl.section(session, name, max_wait_minutes=settings.max_wait_minutes, now=now,
                                limit=limit).entries:
            out.append(StudyOut.from_entry(entry, name))
    return out


@router.get("/api/studies/{study_id:int}", response_model=StudyOut, tags=["studies"])
def get_study(study: StudyDep, settings: SettingsDep) -> StudyOut:
    """Returns one study."""
    entry = wl.entry_for(study, max_wait_minutes=settings.max_wait_minutes)
    return StudyOut.from_entry(entry, wl.section_of(study))


@router.post("/api/studies/{study_id:int}/feedback", response_model=StudyOut, tags=["studies"])
def post_feedback(study: StudyDep, body: FeedbackIn, session: SessionDep, settings: SettingsDep) -> StudyOut:
    """Records the finding for a scored study; the response carries the derived outcome (TP/FP/TN/FN)."""
    if study.status != Status.SCORED:
        raise HTTPException(status_code=409, detail=f"study {study.id} is {study.status}, not scored; "
                                                    "feedback can only be recorded for scored studies")
    repo.record_feedback(session, study_id=study.id, finding=body.finding, comment=body.comment,
                         reviewer=body.reviewer.strip() or "anonymous")
    session.commit()
    return get_study(study, settings)


@router.get("/api/feedback.csv", tags=["export"])
def export_feedback(session: SessionDep) -> Response:
    """Downloads every recorded finding as CSV (the input of `chestaid recalibrate`); no patient names."""
    return Response(feedback_csv(session), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="feedback.csv"',
                             "Cache-Control": "no-store"})


@router.get("/healthz", response_model=HealthOut, tags=["health"],
            responses={503: {"model": HealthOut, "description": "a part is down or no worker has loaded a model"}})
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Ready only when the DB and broker answer and at least one live worker has loaded the model."""
    result = HealthOut(**health_checks.health(session, settings))
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503,
                        headers={"Cache-Control": "no-store"})
