"""The admin's "score anyway" for a film the out-of-distribution guard refused (CSRF-checked, audited)."""
from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from core.intake.ingest import send
from core.override import OverrideError, score_anyway
from web.access import ADMIN_POST, Admin
from web.deps import SessionDep, SettingsDep, client_host

router = APIRouter(default_response_class=HTMLResponse)
log = logging.getLogger("chestaid.web")


def _enqueue(request: Request):
    """The broker callback: app.state.enqueue when set (tests, embedded runs), else the Celery client."""
    enqueue = getattr(request.app.state, "enqueue", None)
    if enqueue is None:
        from worker.app import make_enqueue  # lazy: only this admin action needs a broker client
        enqueue = request.app.state.enqueue = make_enqueue()
    return enqueue


@router.post("/studies/{study_id:int}/score-anyway", dependencies=ADMIN_POST)
def score_anyway_form(request: Request, study_id: int, user: Admin, session: SessionDep, settings: SettingsDep):
    """Queues one guard-refused study for scoring with the guard bypassed; the audit trail names the admin."""
    try:
        score_anyway(session, study_id=study_id, actor=user.name, role=user.role, client=client_host(request))
    except OverrideError as exc:
        session.rollback()
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    session.commit()
    # Sent after the commit; if the broker is down the ingester's sweep sends it (the study is queued).
    send(study_id, settings=settings, enqueue=_enqueue(request))
    return RedirectResponse(f"/studies/{study_id}", status_code=303)
