"""Request dependencies: the app's settings and a per-request database session."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from core import repository as repo
from core.db import get_sessionmaker
from core.models import Study
from core.settings import Settings, get_settings


def app_settings(app: Any) -> Settings:
    """Returns the settings an app was created with, else the process-wide ones (read on first use)."""
    settings = app.state.settings
    if settings is None:
        settings = app.state.settings = get_settings()
    return settings


def get_app_settings(request: Request) -> Settings:
    """Returns the settings of the app serving this request."""
    return app_settings(request.app)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """Yields a session for this request; routes that write commit explicitly."""
    with get_sessionmaker(settings.database_url)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_study_or_404(study_id: int, session: SessionDep) -> Study:
    """Returns the study named in the path, or answers 404."""
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(status_code=404, detail=f"study {study_id} not found")
    return study


StudyDep = Annotated[Study, Depends(get_study_or_404)]


def client_host(request: Request) -> str:
    """Returns the client address for the audit trail and sign-in throttling."""
    return request.client.host if request.client and request.client.host else "unknown"
