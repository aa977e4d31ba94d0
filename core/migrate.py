"""Runs Alembic migrations programmatically, waiting for the database to accept connections first."""
from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from core.db import get_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"


def alembic_config(url: str) -> Config:
    """Returns an Alembic config for the project's migrations against url."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def wait_for_db(url: str, timeout: float = 60.0) -> None:
    """Blocks until the database answers SELECT 1, or raises after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with get_engine(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def upgrade(url: str, revision: str = "head") -> None:
    """Waits for the database and migrates it to revision."""
    wait_for_db(url)
    command.upgrade(alembic_config(url), revision)
