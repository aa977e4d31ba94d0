"""JSON API: the worklist data for scripts and tests, feedback, the feedback export and health.

Scripts authenticate with `Authorization: Bearer <token>`; the browser uses its session cookie (and, for
POST, the X-CSRF-Token header).
"""
from __future__ import annotations

import csv
import io
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from core import audit
from core import repository as repo
from core import worklist as wl
from core.feedback import feedback_csv
from core.models import Status, utcnow
from web import health as health_checks
from web.access import ADMIN, DOCTOR_POST, NURSE, PUBLIC, Admin, Doctor
from web.deps import SessionDep, SettingsDep, StudyDep, client_host
from web.schemas import FeedbackIn, HealthOut, StudyOut

router = APIRouter()

SectionName = Literal["unread", "in_progress", "failed", "duplicates", "read"]


@router.get("/api/studies", response_model=list[StudyOut], tags=["studies"], dependencies=NURSE)
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


@router.get("/api/studies/{study_id:int}", response_model=StudyOut, tags=["studies"], dependencies=NURSE)
def get_study(study: StudyDep, settings: SettingsDep) -> StudyOut:
    """Returns one study."""
    entry = wl.entry_for(study, max_wait_minutes=settings.max_wait_minutes)
    return StudyOut.from_entry(entry, wl.section_of(study))


@router.post("/api/studies/{study_id:int}/feedback", response_model=StudyOut, tags=["studies"],
             dependencies=DOCTOR_POST)
def post_feedback(request: Request, user: Doctor, study: StudyDep, body: FeedbackIn, session: SessionDep,
                  settings: SettingsDep) -> StudyOut:
    """Records the finding for a scored study (doctors); the reviewer is the caller. The response carries
    the derived outcome (TP/FP/TN/FN)."""
    if study.status != Status.SCORED:
        raise HTTPException(status_code=409, detail=f"study {study.id} is {study.status}, not scored; "
                                                    "feedback can only be recorded for scored studies")
    record_finding(session, request, user, study, finding=body.finding, comment=body.comment)
    session.commit()
    return get_study(study, settings)


def record_finding(session, request: Request, user, study, *, finding: str, comment: str | None) -> None:
    """Records a finding by the signed-in user and audits it (recorded, or changed with old and new)."""
    old = study.finding
    repo.record_feedback(session, study_id=study.id, finding=finding, comment=comment, reviewer=user.name)
    audit.record_finding(session, actor=user.name, role=user.role, client=client_host(request), study_id=study.id,
                         old=old, new=finding)


@router.get("/api/feedback.csv", tags=["export"], dependencies=ADMIN)
def export_feedback(request: Request, user: Admin, session: SessionDep) -> Response:
    """Downloads every recorded finding as CSV (admins; the input of `chestaid recalibrate`); no patient names."""
    text = feedback_csv(session)
    rows = sum(1 for _ in csv.reader(io.StringIO(text))) - 1  # comments may span lines
    audit.record(session, actor=user.name, role=user.role, client=client_host(request),
                 action=audit.EXPORT_DOWNLOADED, rows=rows)
    session.commit()
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="feedback.csv"',
                             "Cache-Control": "no-store"})


@router.get("/openapi.json", include_in_schema=False, dependencies=NURSE)
def openapi_schema(request: Request) -> JSONResponse:
    """Returns the OpenAPI schema of the JSON API (signed-in users and tokens)."""
    return JSONResponse(request.app.openapi())


@router.get("/healthz", response_model=HealthOut, tags=["health"], dependencies=PUBLIC,
            responses={503: {"model": HealthOut, "description": "a part is down or no worker has loaded a model"}})
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Ready only when the DB and broker answer and a live worker has loaded the model (public: for load
    balancers; it names no error, the server log does)."""
    result = HealthOut(**health_checks.health(session, settings))
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503,
                        headers={"Cache-Control": "no-store"})
