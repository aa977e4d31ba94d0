"""Database engine and sessions: one engine per URL, a per-job session scope."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import ARRAY, any_, bindparam, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.orm import Session, sessionmaker


@lru_cache
def get_engine(url: str) -> Engine:
    """Returns the engine for a URL; SQLite gets WAL and a busy timeout so web, ingester and worker share it."""
    # hide_parameters: a database error's message would otherwise quote the row's values, and a DICOM study's
    # row holds patient identifiers; those messages reach logs.
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    """Returns the session factory for a URL."""
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yields a session that commits on success, rolls back on error and always closes."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def one_of(session: Session, column, values, item_type) -> ColumnElement[bool]:
    """`column IN values`, written `column = ANY(:array)` on Postgres: one statement text whatever the number of
    values, so the server prepares and plans it once, where an IN list is a new statement (planned anew, ~1–2 ms)
    for each length. SQLite gets the IN list."""
    values = list(values)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(item_type)))
    return column.in_(values)
