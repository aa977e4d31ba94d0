"""Accounts, sign-in throttling, API tokens and the account CLI against real migrated SQLite and Postgres."""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner
from sqlalchemy import select, text

from cli import main as cli_main
from cli._common import cli_actor
from core import audit, auth
from core.db import session_scope
from core.models import AuditEvent, LoginAttempt, User
from core.settings import Settings, get_settings

PW = "correct horse battery"
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
LIMITS = Settings(login_failures_before_delay=5, login_delay_base_seconds=1.0, login_delay_max_seconds=3600,
                  login_failure_memory_seconds=86_400, login_max_failures_per_client=20,
                  login_throttle_window_seconds=900)


def add_user(url: str, name: str = "dana", role: str = "doctor", password: str = PW) -> None:
    with session_scope(url) as s:
        auth.create_user(s, name=name, role=role, password=password, actor="test")


def attempt(url: str, name: str = "dana", password: str = PW, client: str = "10.0.0.1", now=NOW,
            settings: Settings = LIMITS) -> tuple[str | None, float | None]:
    """Returns (the signed-in user's name or None, seconds to wait if throttled or None)."""
    with session_scope(url) as s:
        result = auth.authenticate(s, name=name, password=password, client=client, now=now, settings=settings)
        return (result.user.name if result.user is not None else None), result.retry_after


def login(url: str, name: str = "dana", password: str = PW, client: str = "10.0.0.1", now=NOW,
          settings: Settings = LIMITS) -> str | None:
    """Returns the signed-in user's name, or None."""
    return attempt(url, name, password, client, now, settings)[0]


def actions(url: str) -> list[str]:
    with session_scope(url) as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def test_settings_defaults_are_the_documented_limits():
    s = Settings()
    assert (s.login_failures_before_delay, s.login_delay_base_seconds, s.login_delay_max_seconds,
            s.login_failure_memory_seconds, s.login_max_failures_per_client,
            s.login_throttle_window_seconds) == (5, 1.0, 3600.0, 86_400, 20, 900)
    assert s.trusted_proxies == []


def test_password_is_stored_as_argon2_hash_only(db_url):
    add_user(db_url)
    with session_scope(db_url) as s:
        raw = s.execute(text("SELECT name, role, password_hash, disabled FROM users")).one()
    assert raw.name == "dana" and raw.role == "doctor" and not raw.disabled
    assert raw.password_hash.startswith("$argon2id$")
    assert PW not in raw.password_hash
    assert PasswordHasher().verify(raw.password_hash, PW)


def test_authenticate_right_and_wrong_password(db_url):
    add_user(db_url)
    assert login(db_url, password="wrong password!") is None
    assert login(db_url, name="DANA") == "dana"  # names are case-insensitive
    with session_scope(db_url) as s:
        user = auth.get_user(s, name="dana")
        assert user.last_login_at == NOW
        attempts = [(a.name, a.client, a.outcome) for a in s.scalars(select(LoginAttempt).order_by(LoginAttempt.id))]
        events = s.scalars(select(AuditEvent).where(AuditEvent.action.like("login%")).order_by(AuditEvent.id)).all()
    assert attempts == [("dana", "10.0.0.1", "failure"), ("dana", "10.0.0.1", "success")]
    assert [(e.action, e.actor, e.role, e.client, e.detail) for e in events] == [
        ("login_failure", "dana", None, "10.0.0.1", {"reason": "bad_password"}),
        ("login_success", "dana", "doctor", "10.0.0.1", {})]


def test_unknown_user_and_wrong_password_fail_alike(db_url):
    add_user(db_url)
    unknown = login(db_url, name="nobody", password=PW)
    wrong = login(db_url, name="dana", password="not the password")
    assert unknown is None and wrong is None
    with session_scope(db_url) as s:
        outcomes = list(s.scalars(select(LoginAttempt.outcome).order_by(LoginAttempt.id)))
    assert outcomes == ["failure", "failure"]


def test_unusable_login_name_is_not_written_to_the_trail(db_url):
    typed = "Correct Horse Battery!"  # a password typed into the name field
    assert login(db_url, name=typed) is None
    with session_scope(db_url) as s:
        assert audit.export_csv(s).count("Correct Horse") == 0
        assert s.scalars(select(LoginAttempt.name)).one() == auth.INVALID_NAME


def test_disabled_user_cannot_sign_in(db_url):
    add_user(db_url)
    with session_scope(db_url) as s:
        auth.disable_user(s, name="dana", actor="test")
    assert login(db_url) is None
    with session_scope(db_url) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == audit.LOGIN_FAILURE)).one()
        assert event.detail == {"reason": "disabled"}
        auth.enable_user(s, name="dana", actor="test")
    assert login(db_url) == "dana"


def test_pair_throttle_delays_grow_and_spare_the_owner_on_another_client(db_url, monkeypatch):
    add_user(db_url)
    attacker = "10.6.6.6"
    for i in range(5):  # the free failures: no wait between them
        assert attempt(db_url, password=f"wrong-{i}-password", client=attacker,
                       now=NOW + dt.timedelta(seconds=i)) == (None, None)
    checked = []
    real_verify = auth._verify
    monkeypatch.setattr(auth, "_verify", lambda h, p: checked.append(p) or real_verify(h, p))
    # Each further failure doubles the wait after it: 1, 2, 4, 8 seconds. Trying too early is refused
    # unheard, even with the right password, and says how long is left.
    t = NOW + dt.timedelta(seconds=4)  # the fifth failure
    waits = []
    for n in range(4):
        assert attempt(db_url, client=attacker, now=t + dt.timedelta(seconds=0.25)) == (None, pytest.approx(
            2.0 ** n - 0.25))
        t += dt.timedelta(seconds=2.0 ** n)
        name, wait = attempt(db_url, password="yet another guess", client=attacker, now=t)
        assert name is None and wait is None  # on time: heard, and wrong
        waits.append(attempt(db_url, client=attacker, now=t)[1])
    assert waits == [2.0, 4.0, 8.0, 16.0]
    assert checked == ["yet another guess"] * 4  # throttled attempts never reached the password check
    # The owner, on another client, signs in at once: a stranger's guessing locks nobody out.
    assert attempt(db_url, client="10.0.0.1", now=t) == ("dana", None)
    # The owner's success elsewhere does not clear the attacker's pair.
    assert attempt(db_url, client=attacker, now=t)[1] == 16.0
    with session_scope(db_url) as s:
        throttled = s.scalars(select(AuditEvent).where(AuditEvent.action == audit.LOGIN_THROTTLED)
                              .order_by(AuditEvent.id)).all()
        assert [(e.actor, e.client, e.detail["scope"]) for e in throttled] == [("dana", attacker, "pair")] * 9
        assert [e.detail["retry_after"] for e in throttled] == [1, 2, 2, 4, 4, 8, 8, 16, 16]
        outcomes = list(s.scalars(select(LoginAttempt.outcome).where(LoginAttempt.client == attacker)))
        assert outcomes.count("throttled") == 9 and outcomes.count("failure") == 9
    # Waits stop at the maximum, and failures older than the memory are forgotten.
    assert [auth.login_throttle.pair_delay(f, settings=LIMITS) for f in (4, 5, 6, 16, 17, 10_000)] == [
        0.0, 1.0, 2.0, 2048.0, 3600.0, 3600.0]
    assert attempt(db_url, client=attacker, now=t + dt.timedelta(days=1, seconds=1)) == ("dana", None)


def test_success_clears_the_account_count(db_url):
    add_user(db_url)
    for minute in range(4):
        assert login(db_url, password="wrong password!", now=NOW + dt.timedelta(minutes=minute)) is None
    assert login(db_url, now=NOW + dt.timedelta(minutes=4)) == "dana"
    for minute in range(5, 9):
        assert login(db_url, password="wrong password!", now=NOW + dt.timedelta(minutes=minute)) is None
    assert login(db_url, now=NOW + dt.timedelta(minutes=9)) == "dana"
    assert audit.LOGIN_THROTTLED not in actions(db_url)


def test_client_cap_across_accounts_is_per_address_and_lifts_after_window(db_url):
    add_user(db_url)
    limits = LIMITS.model_copy(update={"login_max_failures_per_client": 4})
    for i in range(4):  # four different accounts guessed from one address (spraying)
        assert login(db_url, name=f"guess{i}", client="10.0.0.66", now=NOW + dt.timedelta(seconds=i),
                     settings=limits) is None
    later = NOW + dt.timedelta(minutes=1)
    # The first failure leaves the 15-minute window 14 minutes from now, bringing the client under the cap.
    assert attempt(db_url, client="10.0.0.66", now=later, settings=limits) == (None, 840.0)
    assert login(db_url, client="10.0.0.7", now=later, settings=limits) == "dana"
    assert login(db_url, client="10.0.0.66", now=NOW + dt.timedelta(minutes=15, seconds=1), settings=limits) == "dana"
    with session_scope(db_url) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == audit.LOGIN_THROTTLED)).one()
    assert (event.client, event.detail) == ("10.0.0.66", {"scope": "client", "retry_after": 840})


def test_weak_hash_is_upgraded_on_login(db_url):
    add_user(db_url)
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PW)
    with session_scope(db_url) as s:
        s.execute(text("UPDATE users SET password_hash = :h WHERE name = 'dana'"), {"h": weak})
    assert login(db_url) == "dana"
    with session_scope(db_url) as s:
        stored = s.scalars(select(User.password_hash)).one()
    assert stored != weak and not PasswordHasher().check_needs_rehash(stored)
    assert PasswordHasher().verify(stored, PW)


def test_roles_hierarchy_and_user_validation(db_url):
    assert auth.ROLES == ("nurse", "doctor", "admin")
    allowed = {(r, n) for r in auth.ROLES for n in auth.ROLES if auth.role_allows(r, n)}
    assert allowed == {("nurse", "nurse"), ("doctor", "nurse"), ("doctor", "doctor"),
                       ("admin", "nurse"), ("admin", "doctor"), ("admin", "admin")}
    assert not auth.role_allows(None, "nurse") and not auth.role_allows("root", "nurse")
    with pytest.raises(ValueError):
        auth.role_allows("admin", "root")
    with session_scope(db_url) as s:
        assert not auth.has_admin(s)  # fresh install: no default account
        auth.create_user(s, name="dana", role="doctor", password=PW, actor="test")
        assert not auth.has_admin(s)
        with pytest.raises(auth.AuthError, match="already exists"):
            auth.create_user(s, name="Dana", role="nurse", password=PW, actor="test")
        with pytest.raises(auth.AuthError, match="role must be one of"):
            auth.create_user(s, name="eve", role="root", password=PW, actor="test")
        with pytest.raises(auth.AuthError, match="at least 10"):
            auth.create_user(s, name="eve", role="nurse", password="short", actor="test")
        with pytest.raises(auth.AuthError, match="user names"):
            auth.create_user(s, name="cli:eve", role="nurse", password=PW, actor="test")
        with pytest.raises(auth.AuthError, match="no user named"):
            auth.disable_user(s, name="ghost", actor="test")
        auth.create_user(s, name="ada", role="admin", password=PW, actor="test")
        assert auth.has_admin(s)
        assert [u.name for u in auth.list_users(s)] == ["ada", "dana"]
        auth.disable_user(s, name="ada", actor="test")
        assert not auth.has_admin(s)


def test_token_works_is_stored_hashed_and_dies_with_its_user(db_url):
    add_user(db_url)
    with session_scope(db_url) as s:
        token = auth.create_token(s, user_name="dana", label="nightly export", actor="test")
    assert token.startswith("ca_") and len(token) > 40
    with session_scope(db_url) as s:
        raw = s.execute(text("SELECT token_hash, label, last_used_at FROM api_tokens")).one()
        assert raw.token_hash != token and token not in raw.token_hash
        assert raw.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert raw.label == "nightly export" and raw.last_used_at is None
        assert auth.user_for_token(s, token=token, now=NOW).name == "dana"
        assert auth.user_for_token(s, token="ca_" + "x" * 43) is None
        assert auth.user_for_token(s, token=token[3:]) is None
        assert auth.user_for_token(s, token="") is None
    with session_scope(db_url) as s:
        assert s.execute(text("SELECT last_used_at FROM api_tokens")).scalar() is not None
        auth.get_user(s, name="dana").disabled = True  # disabled by any path: the token must not work
    with session_scope(db_url) as s:
        assert auth.user_for_token(s, token=token) is None
        auth.get_user(s, name="dana").disabled = False
    with session_scope(db_url) as s:
        assert auth.user_for_token(s, token=token).name == "dana"
        auth.disable_user(s, name="dana", actor="test")
        auth.enable_user(s, name="dana", actor="test")
    with session_scope(db_url) as s:  # disabling revoked it for good
        assert auth.user_for_token(s, token=token) is None


def test_revoked_token_is_refused(db_url):
    add_user(db_url)
    with session_scope(db_url) as s:
        token = auth.create_token(s, user_name="dana", label="", actor="test")
        (row, owner), = auth.list_tokens(s, user_name="dana")
        assert owner == "dana" and row.prefix == token[:8]
        auth.revoke_token(s, token_id=row.id, actor="test")
    with session_scope(db_url) as s:
        assert auth.user_for_token(s, token=token) is None
    assert actions(db_url) == ["user_created", "token_created", "token_revoked"]


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def cli(db_url, monkeypatch):
    """Invokes `chestaid …` against the test database."""
    monkeypatch.setenv("CHESTAID_DATABASE_URL", db_url)
    get_settings.cache_clear()
    runner = CliRunner()
    yield lambda *args, input=None: runner.invoke(cli_main, list(args), input=input)
    get_settings.cache_clear()


def test_cli_user_add_duplicate_disable_passwd(cli, db_url):
    result = cli("user", "add", "Dana", "--role", "doctor", "--password-stdin", input=PW + "\n")
    assert result.exit_code == 0, result.output
    assert "created doctor 'dana'" in result.output
    assert login(db_url) == "dana"

    dup = cli("user", "add", "dana", "--role", "nurse", "--password-stdin", input=PW + "\n")
    assert dup.exit_code == 1 and "already exists" in dup.output
    short = cli("user", "add", "ben", "--role", "nurse", "--password-stdin", input="short\n")
    assert short.exit_code == 1 and "at least 10 characters" in short.output
    bad_role = cli("user", "add", "ben", "--role", "root", "--password-stdin", input=PW + "\n")
    assert bad_role.exit_code == 2 and "nurse" in bad_role.output
    prompted = cli("user", "add", "ada", "--role", "admin", input=f"{PW}x\n{PW}x\n")
    assert prompted.exit_code == 0, prompted.output
    assert login(db_url, name="ada", password=PW + "x") == "ada"

    listed = cli("user", "list")
    assert listed.exit_code == 0
    rows = [line.split()[:3] for line in listed.output.splitlines()[1:]]
    assert rows == [["ada", "admin", "active"], ["dana", "doctor", "active"]]

    new_pw = "another long passphrase"
    assert cli("user", "passwd", "dana", "--password-stdin", input=new_pw + "\n").exit_code == 0
    assert login(db_url, now=NOW + dt.timedelta(minutes=1)) is None
    assert login(db_url, password=new_pw, now=NOW + dt.timedelta(minutes=2)) == "dana"

    ghost = cli("user", "disable", "ghost")
    assert ghost.exit_code == 1 and "no user named 'ghost'" in ghost.output
    assert cli("user", "disable", "dana").exit_code == 0
    assert login(db_url, password=new_pw, now=NOW + dt.timedelta(minutes=3)) is None

    with session_scope(db_url) as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.actor == cli_actor()).order_by(AuditEvent.id)).all()
    assert [(e.action, e.detail.get("user")) for e in events] == [
        ("user_created", "dana"), ("user_created", "ada"), ("password_changed", "dana"), ("user_disabled", "dana")]
    assert cli_actor().startswith("cli:")


def test_cli_token_create_and_audit_export(cli, db_url, tmp_path):
    add_user(db_url)
    created = cli("token", "create", "dana", "--label", "pacs bridge")
    assert created.exit_code == 0, created.output
    token = created.stdout.splitlines()[0]
    assert token.startswith("ca_")
    with session_scope(db_url) as s:
        assert auth.user_for_token(s, token=token).name == "dana"
    unknown = cli("token", "create", "ghost")
    assert unknown.exit_code == 1 and "no user named" in unknown.output
    assert login(db_url, password="wrong password!") is None

    out = tmp_path / "audit.csv"
    exported = cli("audit", "export", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["action"] for r in rows] == ["user_created", "token_created", "login_failure"]
    assert rows[1]["actor"] == cli_actor() and '"label":"pacs bridge"' in rows[1]["detail"]
    assert rows[2]["actor"] == "dana" and rows[2]["client"] == "10.0.0.1"
    assert token not in out.read_text() and PW not in out.read_text()

    stdout = cli("audit", "export")
    assert stdout.exit_code == 0
    assert [r["action"] for r in csv.DictReader(io.StringIO(stdout.stdout))][-1] == "audit_exported"


def test_cli_explains_an_unmigrated_database(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTAID_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_main, ["user", "list"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "chestaid migrate" in result.output
