"""Fixtures for a freshly migrated database per test, on SQLite and on an isolated Postgres database.

audit_events refuses DELETE and TRUNCATE, so Postgres tests cannot empty tables between tests; instead each
test gets its own database, copied from a template migrated once per module (CREATE DATABASE … TEMPLATE).
tests/conftest.py registers this module as a plugin, so every test module can ask for `db_url`.
"""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, text

from core.db import get_engine
from core.migrate import upgrade


def _sibling(base_url: str, name: str) -> str:
    return base_url.rsplit("/", 1)[0] + f"/{name}"


def _admin(base_url: str):
    return create_engine(base_url, isolation_level="AUTOCOMMIT")


def _drop(base_url: str, name: str) -> None:
    get_engine(_sibling(base_url, name)).dispose()
    admin = _admin(base_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="module")
def pg_template(postgres_url):
    """Name of a Postgres database migrated to head, dropped after the module."""
    name = f"chestaid_t_{uuid.uuid4().hex[:12]}_tpl"
    admin = _admin(postgres_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    try:
        upgrade(_sibling(postgres_url, name))
        # A template must have no open connections when it is copied.
        get_engine(_sibling(postgres_url, name)).dispose()
        yield name
    finally:
        _drop(postgres_url, name)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """URL of an empty database migrated to head, on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'chestaid.db'}"
        upgrade(url)
        yield url
        get_engine(url).dispose()
        return
    base = request.getfixturevalue("postgres_url")
    template = request.getfixturevalue("pg_template")
    name = f"chestaid_t_{uuid.uuid4().hex[:12]}"
    admin = _admin(base)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    admin.dispose()
    try:
        yield _sibling(base, name)
    finally:
        _drop(base, name)
