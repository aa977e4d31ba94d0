"""The Chest-Aid web app: worklist, study pages, JSON API and health check.

Run with ``uvicorn web.app:app`` (settings from the environment, read on the first request) or build
one with explicit settings via ``create_app(settings)``. Creating the app touches neither the
database nor the file system; the schema comes from ``chestaid migrate``.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.settings import Settings
from web import api, pages
from web.templating import templates

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Everything is served from this origin: no inline scripts or styles, no third-party hosts.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith("/api/") or path == "/healthz" or path.startswith("/static/"):
        return False
    return "text/html" in request.headers.get("accept", "")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app; without settings, the process-wide ones are read on the first request."""
    # Swagger/ReDoc pages load their code from a CDN; the schema stays at /openapi.json.
    app = FastAPI(title="Chest-Aid", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Chest X-ray triage worklist. Scores are calibrated risk for triage, not diagnoses.")
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if _wants_html(request):
            return templates.TemplateResponse(request, "error.html", {"status_code": exc.status_code,
                                                                      "detail": exc.detail},
                                              status_code=exc.status_code)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        if _wants_html(request):
            return templates.TemplateResponse(request, "error.html", {"status_code": 422, "detail": detail},
                                              status_code=422)
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, exc: SQLAlchemyError):
        # Typically a database that is down or not migrated yet: say so instead of a bare 500.
        detail = f"database unavailable or not migrated (run `chestaid migrate`): {type(exc).__name__}"
        if _wants_html(request):
            return templates.TemplateResponse(request, "error.html", {"status_code": 503, "detail": detail},
                                              status_code=503)
        return JSONResponse({"detail": detail}, status_code=503)

    return app


app = create_app()
