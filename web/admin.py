"""Admin pages: calibrations and the threshold, user accounts, and the audit trail (admins only)."""
from __future__ import annotations

import json
import math
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core import audit, auth, calibrations
from core.models import User
from web.access import ADMIN, ADMIN_POST, Admin
from web.deps import SessionDep, client_host
from web.sessions import session_of
from web.templating import templates

router = APIRouter(default_response_class=HTMLResponse)

AUDIT_PAGE_SIZE = 50


def _done(request: Request, url: str, notice: str) -> RedirectResponse:
    session_of(request).set_notice(notice)
    return RedirectResponse(url, status_code=303)


# --- calibrations and threshold ------------------------------------------------------------------


def _calibrations_page(request: Request, session, *, error: str | None = None, status_code: int = 200,
                       threshold_input: str = "", preview: dict | None = None):
    context = {"calibrations": calibrations.list_all(session), "active": calibrations.active(session),
               "error": error, "notice": session_of(request).pop_notice(), "threshold_input": threshold_input,
               "preview": preview}
    return templates.TemplateResponse(request, "admin_calibrations.html", context, status_code=status_code)


@router.get("/admin/calibrations", dependencies=ADMIN)
def calibrations_page(request: Request, session: SessionDep):
    """Lists calibrations (newest first) with the one in force and its threshold."""
    return _calibrations_page(request, session)


@router.post("/admin/calibrations/activate", dependencies=ADMIN_POST)
def activate(request: Request, user: Admin, session: SessionDep, version: Annotated[str, Form(max_length=128)]):
    """Puts a registered calibration in force; every scored study is re-scored from its stored logit."""
    try:
        rescored = calibrations.activate(session, version=version, actor=user.name, actor_role=user.role,
                                         client=client_host(request))
    except calibrations.CalibrationError:
        session.rollback()
        return _calibrations_page(request, session, error=f"There is no calibration {version!r}.", status_code=404)
    session.commit()
    return _done(request, "/admin/calibrations",
                 f"Calibration {version} is in force; {rescored} studies were re-scored.")


@router.post("/admin/calibrations/threshold", dependencies=ADMIN_POST)
def set_threshold(request: Request, user: Admin, session: SessionDep,
                  threshold: Annotated[str, Form(max_length=32)], confirm: Annotated[str, Form(max_length=8)] = ""):
    """Sets a new threshold for the calibration in force, as a new calibration version put in force. Without
    `confirm=yes` it only shows what the change would do (studies that change flag, sensitivity/specificity
    on recorded findings) and asks to confirm."""
    if calibrations.active(session) is None:
        return _calibrations_page(request, session, status_code=409,
                                  error="No calibration is in force yet, so there is no threshold to change.")
    try:
        value = calibrations.parse_threshold(threshold)
    except calibrations.CalibrationError as exc:
        return _calibrations_page(request, session, status_code=422, threshold_input=threshold, error=str(exc))
    if confirm != "yes":
        return _calibrations_page(request, session, threshold_input=threshold,
                                  preview=calibrations.threshold_preview(session, threshold=value))
    old, cal, rescored = calibrations.set_threshold(session, threshold=value, actor=user.name,
                                                    actor_role=user.role, client=client_host(request))
    if cal is old:
        return _done(request, "/admin/calibrations", f"The threshold is already {value:g}; nothing changed.")
    session.commit()
    return _done(request, "/admin/calibrations",
                 f"Threshold changed from {old.threshold:g} to {value:g} (calibration {cal.version}); "
                 f"{rescored} studies were re-scored.")


# --- users ---------------------------------------------------------------------------------------


def _users_page(request: Request, session, *, error: str | None = None, status_code: int = 200,
                form: dict | None = None, confirm_disable: str | None = None):
    context = {"users": auth.list_users(session), "roles": auth.ROLES, "error": error,
               "notice": session_of(request).pop_notice(), "form": form or {"name": "", "role": "nurse"},
               "min_password": auth.MIN_PASSWORD_LENGTH, "confirm_disable": confirm_disable}
    return templates.TemplateResponse(request, "admin_users.html", context, status_code=status_code)


@router.get("/admin/users", dependencies=ADMIN)
def users_page(request: Request, session: SessionDep):
    """Lists accounts with a form to add one."""
    return _users_page(request, session)


@router.post("/admin/users", dependencies=ADMIN_POST)
def create_user(request: Request, user: Admin, session: SessionDep, name: Annotated[str, Form(max_length=255)],
                role: Annotated[str, Form(max_length=16)], password: Annotated[str, Form()],
                password_again: Annotated[str, Form()]):
    """Creates an account with an initial password (audited)."""
    form = {"name": name, "role": role}
    if password != password_again:
        return _users_page(request, session, error="The two passwords differ.", status_code=422, form=form)
    try:
        created = auth.create_user(session, name=name, role=role, password=password, actor=user.name,
                                   actor_role=user.role, client=client_host(request))
    except auth.AuthError as exc:
        session.rollback()
        return _users_page(request, session, error=str(exc), status_code=422, form=form)
    session.commit()
    return _done(request, "/admin/users", f"Created {created.role} {created.name}.")


def _target(session, name: str) -> User:
    target = auth.get_user(session, name=name)
    if target is None:
        raise HTTPException(status_code=404, detail=f"no user named {name!r}")
    return target


@router.post("/admin/users/{name}/disable", dependencies=ADMIN_POST)
def disable_user(request: Request, user: Admin, session: SessionDep, name: str,
                 confirm: Annotated[str, Form(max_length=8)] = ""):
    """Disables an account: it can no longer sign in, its sessions end and its API tokens are revoked. Without
    `confirm=yes` it asks to confirm first."""
    target = _target(session, name)
    if target.id == user.id:
        return _users_page(request, session, status_code=409,
                           error="You cannot disable your own account (another admin can).")
    if confirm != "yes":
        return _users_page(request, session, confirm_disable=target.name)
    auth.disable_user(session, name=target.name, actor=user.name, actor_role=user.role, client=client_host(request))
    session.commit()
    return _done(request, "/admin/users", f"Disabled {target.name}; their API tokens are revoked.")


@router.post("/admin/users/{name}/enable", dependencies=ADMIN_POST)
def enable_user(request: Request, user: Admin, session: SessionDep, name: str):
    """Re-enables a disabled account (its old API tokens stay revoked)."""
    target = _target(session, name)
    auth.enable_user(session, name=target.name, actor=user.name, actor_role=user.role, client=client_host(request))
    session.commit()
    return _done(request, "/admin/users", f"Enabled {target.name}.")


# --- audit trail ---------------------------------------------------------------------------------


@router.get("/admin/audit", dependencies=ADMIN)
def audit_page(request: Request, session: SessionDep, action: str = "",
               actor: Annotated[str, Query(max_length=255)] = "", page: Annotated[int, Query(ge=1)] = 1):
    """Browses the audit trail, newest first, optionally by action and actor."""
    if action and action not in audit.ACTIONS:
        raise HTTPException(status_code=422, detail=f"unknown audit action {action!r}")
    filters = {"action": action or None, "actor": actor.strip() or None}
    total = audit.count_events(session, **filters)
    pages = max(1, math.ceil(total / AUDIT_PAGE_SIZE))
    events = audit.list_events(session, limit=AUDIT_PAGE_SIZE, offset=(page - 1) * AUDIT_PAGE_SIZE, **filters)
    query = {k: v for k, v in (("action", action), ("actor", actor.strip())) if v}

    def page_url(n: int) -> str:
        return "/admin/audit?" + urlencode({**query, "page": n})

    context = {"events": events, "total": total, "page": page, "pages": pages, "actions": sorted(audit.ACTIONS),
               "action": action, "actor": actor.strip(), "page_url": page_url,
               "csv_url": "/admin/audit.csv", "detail_json": lambda d: json.dumps(d or {}, sort_keys=True)}
    return templates.TemplateResponse(request, "admin_audit.html", context)


@router.get("/admin/audit.csv", dependencies=ADMIN)
def audit_csv(request: Request, user: Admin, session: SessionDep) -> Response:
    """Downloads the whole audit trail as CSV (the download itself is audited)."""
    text = audit.export_csv(session)
    audit.record(session, actor=user.name, role=user.role, client=client_host(request), action=audit.AUDIT_EXPORTED,
                 destination="download")
    session.commit()
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="chestaid-audit.csv"',
                             "Cache-Control": "no-store"})
