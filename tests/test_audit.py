"""The audit trail against real migrated SQLite and Postgres: recording, listing, export, append-only."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from core import audit, auth
from core.db import get_engine, session_scope
from core.models import AuditEvent, LoginAttempt
from core.settings import Settings

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
PW = "a long enough secret"


def test_record_list_filter_and_count(db_url):
    with session_scope(db_url) as s:
        audit.record(s, actor="dana", role="doctor", client="10.0.0.5", action=audit.FINDING_RECORDED, study_id=7,
                     finding="pneumonia", at=T0)
        audit.record(s, actor="ada", role="admin", client="10.0.0.9", action=audit.EXPORT_DOWNLOADED, rows=12,
                     at=T0 + dt.timedelta(minutes=1))
        audit.record(s, actor="ada", role="admin", action=audit.THRESHOLD_CHANGED, old=0.5, new=0.42,
                     at=T0 + dt.timedelta(minutes=2))
    with session_scope(db_url) as s:
        newest = audit.list_events(s, limit=10)
        assert [e.action for e in newest] == ["threshold_changed", "export_downloaded", "finding_recorded"]
        first = newest[-1]
        assert (first.actor, first.role, first.client, first.study_id, first.at, first.detail) == (
            "dana", "doctor", "10.0.0.5", 7, T0, {"finding": "pneumonia"})
        assert newest[0].detail == {"old": 0.5, "new": 0.42} and newest[0].client is None
        assert [e.action for e in audit.list_events(s, limit=1, offset=1)] == ["export_downloaded"]
        assert [e.action for e in audit.list_events(s, limit=10, actor="ada")] == ["threshold_changed",
                                                                                  "export_downloaded"]
        assert [e.actor for e in audit.list_events(s, limit=10, action=audit.FINDING_RECORDED)] == ["dana"]
        assert audit.count_events(s) == 3 and audit.count_events(s, actor="ada") == 2
        assert audit.count_events(s, action=audit.LOGOUT) == 0


def test_unknown_actions_secrets_and_patient_identifiers_are_refused(db_url):
    with session_scope(db_url) as s:
        with pytest.raises(audit.AuditError, match="unknown audit action"):
            audit.record(s, actor="ada", action="deleted_everything")
        for key in ("password", "token", "source_name", "patient_name", "comment"):
            with pytest.raises(audit.AuditError, match=key):
                audit.record(s, actor="ada", action=audit.LOGOUT, **{key: "x"})
        with pytest.raises(audit.AuditError, match="JSON"):
            audit.record(s, actor="ada", action=audit.LOGOUT, when=T0)
        assert audit.count_events(s) == 0


def test_record_finding_keeps_old_and_new_value(db_url):
    with session_scope(db_url) as s:
        audit.record_finding(s, actor="dana", role="doctor", client="10.0.0.5", study_id=3, old=None, new="normal")
        audit.record_finding(s, actor="lee", role="doctor", client="10.0.0.6", study_id=3, old="normal",
                             new="pneumonia")
    with session_scope(db_url) as s:
        events = [(e.action, e.actor, e.study_id, e.detail) for e in audit.list_events(s, limit=5)]
    assert events == [("finding_changed", "lee", 3, {"old": "normal", "new": "pneumonia"}),
                      ("finding_recorded", "dana", 3, {"finding": "normal"})]


@pytest.mark.parametrize("statement", ["UPDATE audit_events SET actor = 'mallory'",
                                       "UPDATE audit_events SET detail = '{}' WHERE id = 1",
                                       "DELETE FROM audit_events",
                                       "DELETE FROM audit_events WHERE id = 1"])
def test_database_refuses_to_rewrite_the_trail(db_url, statement):
    with session_scope(db_url) as s:
        audit.record(s, actor="dana", role="doctor", action=audit.LOGIN_SUCCESS, at=T0)
    with pytest.raises(DBAPIError, match="append-only"):
        with get_engine(db_url).begin() as conn:
            conn.execute(text(statement))
    with session_scope(db_url) as s:
        (event,) = audit.list_events(s, limit=10)
        assert (event.id, event.actor, event.action) == (1, "dana", "login_success")


def test_orm_delete_and_postgres_truncate_are_refused(db_url):
    with session_scope(db_url) as s:
        audit.record(s, actor="dana", action=audit.LOGOUT, at=T0)
    with pytest.raises(DBAPIError, match="append-only"):
        with session_scope(db_url) as s:
            s.delete(s.scalars(select(AuditEvent)).one())
    if db_url.startswith("postgresql"):
        with pytest.raises(DBAPIError, match="append-only"):
            with get_engine(db_url).begin() as conn:
                conn.execute(text("TRUNCATE audit_events"))
    with session_scope(db_url) as s:
        assert audit.count_events(s) == 1


def test_export_csv_columns_detail_and_formula_guard(db_url):
    with session_scope(db_url) as s:
        audit.record(s, actor="ada", role="admin", client="10.0.0.9", action=audit.CALIBRATION_ACTIVATED,
                     version="platt-2026-03", at=T0)
        audit.record(s, actor="=HYPERLINK(\"http://x\")", action=audit.LOGIN_FAILURE, client="-1+1",
                     reason="unknown_user", at=T0 + dt.timedelta(seconds=1))
        text_out = audit.export_csv(s)
    rows = list(csv.DictReader(io.StringIO(text_out)))
    assert list(rows[0]) == audit.COLUMNS
    assert rows[0] == {"id": "1", "at": "2026-03-01T08:00:00+00:00", "actor": "ada", "role": "admin",
                       "client": "10.0.0.9", "action": "calibration_activated", "study_id": "",
                       "detail": '{"version":"platt-2026-03"}'}
    assert rows[1]["actor"] == "'=HYPERLINK(\"http://x\")" and rows[1]["client"] == "'-1+1"
    assert json.loads(rows[1]["detail"]) == {"reason": "unknown_user"}


def test_every_account_action_is_audited_without_secrets(db_url):
    """Runs each audited account action once, then reads the whole trail back."""
    limits = Settings(login_failures_before_delay=2, login_delay_base_seconds=120, login_max_failures_per_client=20,
                      login_throttle_window_seconds=900)
    with session_scope(db_url) as s:
        auth.create_user(s, name="ada", role="admin", password=PW, actor="cli:root")
        auth.create_user(s, name="dana", role="doctor", password=PW, actor="ada", actor_role="admin",
                         client="10.0.0.9")
        token = auth.create_token(s, user_name="dana", label="script", actor="ada", actor_role="admin",
                                  client="10.0.0.9")
        auth.set_password(s, name="dana", password=PW + "!", actor="dana", actor_role="doctor", client="10.0.0.5")
    for minute, password in enumerate([PW + "!", "guess one two", "guess three four", PW + "!"]):
        with session_scope(db_url) as s:
            auth.authenticate(s, name="dana", password=password, client="10.0.0.5",
                              now=T0 + dt.timedelta(minutes=minute), settings=limits)
    with session_scope(db_url) as s:
        auth.disable_user(s, name="dana", actor="ada", actor_role="admin", client="10.0.0.9")
        auth.enable_user(s, name="dana", actor="ada", actor_role="admin", client="10.0.0.9")
        (row, _), = auth.list_tokens(s)
        auth.revoke_token(s, token_id=row.id, actor="ada", actor_role="admin", client="10.0.0.9")
        auth.sign_out(s, user=auth.get_user(s, name="dana"), client="10.0.0.5")
    with session_scope(db_url) as s:
        events = [(e.action, e.actor, e.role, e.client, e.detail)
                  for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
        trail = audit.export_csv(s)
        attempts = " ".join(a.name + a.client for a in s.scalars(select(LoginAttempt)))
    assert events == [
        ("user_created", "cli:root", None, None, {"user": "ada", "user_role": "admin"}),
        ("user_created", "ada", "admin", "10.0.0.9", {"user": "dana", "user_role": "doctor"}),
        ("token_created", "ada", "admin", "10.0.0.9", {"user": "dana", "token_id": row.id, "label": "script"}),
        ("password_changed", "dana", "doctor", "10.0.0.5", {"user": "dana"}),
        ("login_success", "dana", "doctor", "10.0.0.5", {}),
        ("login_failure", "dana", None, "10.0.0.5", {"reason": "bad_password"}),
        ("login_failure", "dana", None, "10.0.0.5", {"reason": "bad_password"}),
        ("login_throttled", "dana", None, "10.0.0.5", {"scope": "pair", "retry_after": 60}),
        ("user_disabled", "ada", "admin", "10.0.0.9", {"user": "dana", "tokens_revoked": 1}),
        ("user_enabled", "ada", "admin", "10.0.0.9", {"user": "dana"}),
        ("logout", "dana", "doctor", "10.0.0.5", {}),
    ]
    # revoke_token found the token already revoked by disable_user, so it added no second row.
    for secret in (PW, "guess one", "guess three", token, token[3:]):
        assert secret not in trail and secret not in attempts
