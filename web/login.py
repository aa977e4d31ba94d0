"""Sign-in and sign-out pages."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from core import audit, auth
from web.access import NURSE_POST, PUBLIC, CurrentUser, Nurse, csrf_matches
from web.deps import SessionDep, SettingsDep, client_host
from web.sessions import session_of
from web.templating import templates

router = APIRouter(default_response_class=HTMLResponse)

# One message for every refusal: unknown name, wrong password, disabled account, throttled.
SIGN_IN_FAILED = ("Sign-in failed. Check your name and password. After several failed attempts, "
                  "sign-in is paused for a while.")
FORM_EXPIRED = "The sign-in form had expired. Please sign in again."
FIRST_ADMIN_COMMAND = "chestaid user add NAME --role admin"


def safe_next(value: str | None) -> str:
    """Returns value if it is a relative URL on this site (never another host), else "/"."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if any(ord(c) < 32 or c == "\\" for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.path in ("/login", "/logout"):
        return "/"
    return value


def _login_page(request: Request, session, *, next_url: str, name: str = "", error: str | None = None,
                status_code: int = 200):
    context = {"next": next_url, "name": name, "error": error, "notice": session_of(request).pop_notice(),
               "no_admin": not auth.has_admin(session), "first_admin_command": FIRST_ADMIN_COMMAND}
    return templates.TemplateResponse(request, "login.html", context, status_code=status_code)


@router.get("/login", dependencies=PUBLIC)
def login_page(request: Request, session: SessionDep, user: CurrentUser, next: str = "/"):
    """Shows the sign-in form (or, when already signed in, goes on to the requested page)."""
    if user is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, session, next_url=safe_next(next))


@router.post("/login", dependencies=PUBLIC)
def login_submit(request: Request, session: SessionDep, settings: SettingsDep,
                 name: Annotated[str, Form(max_length=255)] = "", password: Annotated[str, Form()] = "",
                 next: Annotated[str, Form()] = "/", csrf_token: Annotated[str, Form()] = ""):
    """Checks the name and password (throttled, audited) and starts a session."""
    next_url = safe_next(next)
    if not csrf_matches(request, csrf_token):
        return _login_page(request, session, next_url=next_url, name=name, error=FORM_EXPIRED, status_code=403)
    user = auth.authenticate(session, name=name, password=password, client=client_host(request), settings=settings)
    session.commit()
    if user is None:
        return _login_page(request, session, next_url=next_url, name=name, error=SIGN_IN_FAILED, status_code=401)
    session_of(request).start(user.id)
    return RedirectResponse(next_url, status_code=303)


@router.post("/logout", dependencies=NURSE_POST)
def logout(request: Request, session: SessionDep, user: Nurse):
    """Ends the session (audited) and shows the sign-in page."""
    audit.record(session, actor=user.name, role=user.role, client=client_host(request), action=audit.LOGOUT)
    session.commit()
    session_of(request).end("You are signed out.")
    return RedirectResponse("/login", status_code=303)
