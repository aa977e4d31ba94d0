"""The Alembic migrations are the schema: they match the models and go down and up again, on both backends."""
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import get_engine
from core.migrate import alembic_config
from core.models import Base


def schema_drift(url: str) -> list:
    with get_engine(url).connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_migrations_match_models_and_round_trip(db_url):
    assert schema_drift(db_url) == []
    cfg = alembic_config(db_url)
    command.downgrade(cfg, "base")
    get_engine(db_url).dispose()
    assert set(inspect(get_engine(db_url)).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    get_engine(db_url).dispose()
    assert {"studies", "calibrations", "worker_heartbeats", "users", "audit_events"} <= set(
        inspect(get_engine(db_url)).get_table_names())
    assert schema_drift(db_url) == []
