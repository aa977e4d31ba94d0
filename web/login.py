"""Sign-in and sign-out pages."""
from __future__ import annotations

import datetime as dt
import math
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from core import auth
from web.access import NURSE_POST, PUBLIC, CurrentUser, Nurse, csrf_matches
from web.deps import SessionDep, SettingsDep, client_host
from web import sessions
from web.sessions import session_of
from web.templating import templates

router = APIRouter(default_response_class=HTMLResponse)

# One message for every refusal (unknown name, wrong password, disabled account), so none tells which.
SIGN_IN_FAILED = ("Sign-in failed. Check your name and password. After several failed attempts, "
                  "each further attempt from this device has to wait a little longer.")
# Throttling counts by the name typed, known or not, so saying so reveals nothing about the account.
THROTTLED = ("Too many failed sign-ins from this device. Please wait {seconds} seconds before trying again, "
             "or sign in from another device.")
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
                status_code: int = 200, headers: dict[str, str] | None = None):
    context = {"next": next_url, "name": name, "error": error, "notice": session_of(request).pop_notice(),
               "no_admin": not auth.has_admin(session), "first_admin_command": FIRST_ADMIN_COMMAND}
    return templates.TemplateResponse(request, "login.html", context, status_code=status_code, headers=headers)


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
    """Checks the name and password (throttled, audited) and starts a session.

    A throttled attempt is answered 429 with Retry-After (whole seconds), the password unchecked.
    """
    next_url = safe_next(next)
    if not csrf_matches(request, csrf_token):
        return _login_page(request, session, next_url=next_url, name=name, error=FORM_EXPIRED, status_code=403)
    # The session clock (web.sessions.now), so tests move time for throttling and sessions alike.
    now = dt.datetime.fromtimestamp(sessions.now(), tz=dt.timezone.utc)
    result = auth.authenticate(session, name=name, password=password, client=client_host(request),
                               settings=settings, now=now)
    session.commit()
    if result.retry_after is not None:
        seconds = max(1, math.ceil(result.retry_after))
        return _login_page(request, session, next_url=next_url, name=name, error=THROTTLED.format(seconds=seconds),
                           status_code=429, headers={"Retry-After": str(seconds)})
    if result.user is None:
        return _login_page(request, session, next_url=next_url, name=name, error=SIGN_IN_FAILED, status_code=401)
    session_of(request).start(result.user.id, generation=result.user.session_generation)
    return RedirectResponse(next_url, status_code=303)


@router.post("/logout", dependencies=NURSE_POST)
def logout(request: Request, session: SessionDep, user: Nurse):
    """Ends the session, and every other session of this user, so a copied cookie dies too (audited)."""
    auth.sign_out(session, user=user, client=client_host(request))
    session.commit()
    session_of(request).end("You are signed out.")
    return RedirectResponse("/login", status_code=303)
