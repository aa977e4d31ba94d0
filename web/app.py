"""The Chest-Aid web app: sign-in, worklist, study pages, admin pages, JSON API and health check.

Run with ``uvicorn web.app:app`` (settings from the environment, read on the first request) or build
one with explicit settings via ``create_app(settings)``. Creating the app touches neither the
database nor the file system; the schema comes from ``chestaid migrate``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from core.settings import Settings
from web import admin, api, login, override, pages, performance
from web.access import SignInRequired, TokenRejected, is_api_path, is_api_route, iter_routes, route_access
from web.deps import app_settings
from web.login import safe_next
from web.security import CSP, SECURITY_HEADERS, BodyLimitMiddleware, InternalErrorMiddleware, SecurityHeadersMiddleware
from web.sessions import SessionMiddleware
from web.templating import templates

__all__ = ["CSP", "SECURITY_HEADERS", "app", "create_app"]

log = logging.getLogger("chestaid.web")  # messages carry paths with numeric ids, never patient data
STATIC_DIR = Path(__file__).resolve().parent / "static"
TITLES = {401: "Sign-in required", 403: "Not allowed", 404: "Not found", 413: "Request too large",
          500: "Something went wrong", 503: "Service unavailable"}


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if is_api_path(path) or path == "/healthz" or path.startswith("/static/"):
        return False
    return "text/html" in request.headers.get("accept", "")


def _error_page(request: Request, status_code: int, detail, headers: dict | None = None):
    return templates.TemplateResponse(request, "error.html", {"status_code": status_code, "detail": detail,
                                                              "title": TITLES.get(status_code, "Request not accepted")},
                                      status_code=status_code, headers=headers)


def _login_url(request: Request) -> str:
    """Returns /login with the page to come back to (same-site relative URLs only)."""
    target = None
    if request.headers.get("HX-Request") == "true":
        # A polled fragment is no page to return to; the page the browser shows is.
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        if current.netloc == request.url.netloc:
            target = current.path + (f"?{current.query}" if current.query else "")
    elif request.method in ("GET", "HEAD"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = safe_next(target)
    return "/login" if target == "/" else f"/login?next={quote(target, safe='/')}"


def _internal_error(scope) -> Response:
    """The answer to an unhandled exception: says nothing about it (it is in the server log)."""
    request = Request(scope)
    detail = "internal error: the problem has been logged on the server"
    if _wants_html(request):
        return _error_page(request, 500, detail)
    return JSONResponse({"detail": detail}, status_code=500)


def check_access_rules(app: FastAPI) -> None:
    """Refuses to build an app with a route that declares no access rule, or a POST without CSRF."""
    for route in iter_routes(app):
        if isinstance(getattr(route, "original_route", route), Mount) and route.path == "/static":
            continue
        if not is_api_route(route):
            raise RuntimeError(f"route {getattr(route, 'path', route)!r} is not a FastAPI route with an access rule")
        role, csrf = route_access(route)
        if role is None:
            raise RuntimeError(f"route {route.path} declares no access rule (web.access NURSE, ADMIN, PUBLIC …)")
        if route.methods - {"GET", "HEAD"} and role != "public" and not csrf:
            raise RuntimeError(f"state-changing route {route.path} does not check the CSRF token")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app; without settings, the process-wide ones are read on the first request."""
    # Swagger/ReDoc pages load their code from a CDN; the schema is at /openapi.json for signed-in users.
    app = FastAPI(title="Chest-Aid", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Chest X-ray triage worklist. Scores are calibrated risk for triage, not diagnoses. "
                              "Scripts authenticate with `Authorization: Bearer <token>` (`chestaid token create`).")
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(login.router)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(performance.router)
    app.include_router(override.router)
    check_access_rules(app)
    # Outermost last: every answer gets the headers, oversized bodies never reach the session or the app,
    # and an exception inside becomes a generic 500 page.
    app.add_middleware(InternalErrorMiddleware, respond=_internal_error)
    app.add_middleware(SessionMiddleware, settings_for=app_settings)
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda a: app_settings(a).max_request_bytes)
    app.add_middleware(SecurityHeadersMiddleware)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, exc: SignInRequired):
        if is_api_path(request.url.path):
            return JSONResponse({"detail": "sign-in required: send an API token (Authorization: Bearer <token>)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if request.headers.get("HX-Request") == "true":
            # htmx would follow a redirect inside the page; this makes the browser go to the sign-in page.
            return JSONResponse({"detail": "sign-in required"}, status_code=401,
                                headers={"HX-Redirect": _login_url(request)})
        return RedirectResponse(_login_url(request), status_code=303)

    @app.exception_handler(TokenRejected)
    async def token_rejected(request: Request, exc: TokenRejected):
        return JSONResponse({"detail": "API token not accepted: unknown, revoked, or its user is disabled"},
                            status_code=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if _wants_html(request):
            return _error_page(request, exc.status_code, exc.detail, exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        if _wants_html(request):
            return _error_page(request, 422, detail)
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, exc: SQLAlchemyError):
        # Typically a database that is down or not migrated yet: say so instead of a bare 500.
        detail = f"database unavailable or not migrated (run `chestaid migrate`): {type(exc).__name__}"
        log.error("database error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        if _wants_html(request):
            return _error_page(request, 503, detail)
        return JSONResponse({"detail": detail}, status_code=503)

    return app


app = create_app()
