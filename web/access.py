"""Who is asking and what they may do: session or API-token users, role requirements, CSRF checks.

Every route declares its access rule as its first dependencies (`NURSE`, `DOCTOR_POST`, `PUBLIC`, …), so
it is checked before the route looks anything up; `create_app` refuses to start with a route lacking one.
"""
from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute

from core import auth
from core.models import User
from web.deps import SessionDep
from web.sessions import session_of

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC_ROLE = "public"
CSRF_REFUSED = ("The form was out of date or did not come from this site (CSRF check failed). "
                "Go back, reload the page and try again.")


class SignInRequired(Exception):
    """Raised when a route needs a signed-in user and there is none (answered 303 to /login, or 401)."""


class TokenRejected(Exception):
    """Raised for an API request whose bearer token is unknown, revoked, or of a disabled user (401)."""


def is_api_path(path: str) -> bool:
    """Tells whether a path belongs to the JSON API (bearer tokens, 401 instead of redirects)."""
    return path.startswith("/api/") or path == "/openapi.json"


def _is_background_poll(request: Request) -> bool:
    # htmx polling is not someone at the keyboard: it must not keep an unattended session alive.
    return request.method == "GET" and request.headers.get("HX-Request") == "true"


def current_user(request: Request, session: SessionDep) -> User | None:
    """Returns the signed-in user (API token on /api/*, else the session cookie), or None.

    A session whose user is gone, disabled, changed password or signed out (anywhere) after it was issued
    is ended: its cookie carries an older session generation than the user's.
    """
    if hasattr(request.state, "user"):
        return request.state.user
    request.state.user, request.state.via = None, None
    header = request.headers.get("authorization")
    if header is not None and is_api_path(request.url.path):
        scheme, _, token = header.partition(" ")
        user = auth.user_for_token(session, token=token.strip()) if scheme.lower() == "bearer" else None
        session.commit()  # keeps the token's last-used time
        if user is None:
            raise TokenRejected()
        request.state.user, request.state.via = user, "token"
        return user
    state = session_of(request)
    if state.user_id is None:
        return None
    user = auth.get_user_by_id(session, user_id=state.user_id)
    if (user is None or user.disabled or user.password_changed_at.timestamp() > state.issued_at
            or state.generation != user.session_generation):
        state.end("You have been signed out. Please sign in again.")
        return None
    if not _is_background_poll(request):
        state.touch()
    request.state.user, request.state.via = user, "session"
    return user


CurrentUser = Annotated[User | None, Depends(current_user)]


def _requirement(role: str):
    def require(user: CurrentUser) -> User:
        if user is None:
            raise SignInRequired()
        if not auth.role_allows(user.role, role):
            raise HTTPException(status_code=403,
                                detail=f"This needs the {role} role; you are signed in as {user.role} {user.name}.")
        return user

    require.__name__ = require.__qualname__ = f"require_{role}"
    require.__doc__ = f"Returns the signed-in user if they have the {role} role (or above)."
    require.access_role = role
    return require


require_nurse, require_doctor, require_admin = (_requirement(r) for r in auth.ROLES)


def public() -> None:
    """Marks a route anyone may use, signed in or not."""


public.access_role = PUBLIC_ROLE

Nurse = Annotated[User, Depends(require_nurse)]
Doctor = Annotated[User, Depends(require_doctor)]
Admin = Annotated[User, Depends(require_admin)]


def csrf_matches(request: Request, sent: object) -> bool:
    """Compares a submitted CSRF token with the session's, in constant time."""
    expected = session_of(request).data.get("csrf")
    if not isinstance(sent, str) or not isinstance(expected, str) or not expected:
        return False
    return hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8"))


async def verify_csrf(request: Request, user: CurrentUser) -> None:
    """Refuses (403) a state-changing browser request without this session's CSRF token.

    Forms send it as a hidden field, htmx and scripts as the X-CSRF-Token header. Requests with an API
    token carry no cookie, so a third-party page cannot forge them, and need none.
    """
    if request.state.via == "token":
        return
    sent = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if sent is None and content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        sent = (await request.form()).get(CSRF_FIELD)
    if not csrf_matches(request, sent):
        raise HTTPException(status_code=403, detail=CSRF_REFUSED)


# Access rules, listed first in each route's `dependencies` so they run before anything else.
PUBLIC = [Depends(public)]
NURSE = [Depends(require_nurse)]
DOCTOR = [Depends(require_doctor)]
ADMIN = [Depends(require_admin)]
NURSE_POST = [Depends(require_nurse), Depends(verify_csrf)]
DOCTOR_POST = [Depends(require_doctor), Depends(verify_csrf)]
ADMIN_POST = [Depends(require_admin), Depends(verify_csrf)]


def iter_routes(app) -> Iterator:
    """Yields every route the app serves, included routers expanded (each has .path, .methods, and for
    FastAPI routes .dependant)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before lazily included routers: app.routes is already flat
        yield from app.routes
        return
    yield from iter_route_contexts(app.routes)


def is_api_route(route) -> bool:
    """Tells whether a route (or a FastAPI route context) is a FastAPI route with dependencies."""
    return isinstance(getattr(route, "original_route", route), APIRoute)


def route_access(route) -> tuple[str | None, bool]:
    """Returns the role a route requires ("public", a role, or None if it declares no rule first) and
    whether it checks CSRF."""
    dependencies = route.dependant.dependencies
    roles = [r for r in (getattr(d.call, "access_role", None) for d in dependencies) if r is not None]
    csrf = any(d.call is verify_csrf for d in dependencies)
    # The rule must come first, so nothing (a study lookup, a CSRF check) answers before it does.
    if not roles or not hasattr(dependencies[0].call, "access_role"):
        return None, csrf
    if PUBLIC_ROLE in roles and len(set(roles)) > 1:
        raise RuntimeError(f"route {route.path} is marked both public and role-restricted")
    return max(roles, key=lambda r: -1 if r == PUBLIC_ROLE else auth.ROLES.index(r)), csrf
