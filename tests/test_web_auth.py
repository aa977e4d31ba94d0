"""Accounts in the web app over HTTP, on migrated SQLite and Postgres: access rules for every route, sign-in
and its throttle, sessions, CSRF, API tokens, the audit trail, admin pages, headers and request hygiene."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, text

from core import audit, auth
from core import calibrations
from core import repository as repo
from core.db import get_engine, session_scope
from core.models import AuditEvent, Base, Calibration, LoginAttempt
from core.settings import Settings
from tests.conftest import fixture_images
from tests.test_web import PASSWORD, csrf_token, sign_in
from web import sessions
from web.access import is_api_route, iter_routes, route_access
from web.app import create_app
from web.login import SIGN_IN_FAILED, THROTTLED, safe_next

HTML = {"Accept": "text/html"}
USERS = {"nurse": "nina", "doctor": "dora", "admin": "adam"}
RANK = {"public": -1, "nurse": 0, "doctor": 1, "admin": 2}
PATIENT_FILE = "DOE_JOHN_1961-02-03.jpeg"  # a source name carrying a patient's name and birth date


@dataclass
class AuthSite:
    settings: Settings
    app: FastAPI
    flagged: int  # scored, above the threshold, film and heat-map on disk
    unflagged: int


def build_site(root: Path, database_url: str, **overrides) -> AuthSite:
    """Two scored studies with films and heat-maps on disk, a calibration in force, a live worker, and users."""
    settings = Settings(data_dir=root / "data", inbox=root / "inbox", database_url=database_url, **overrides)
    settings.ensure_dirs()
    ids = []
    with session_scope(database_url) as s:
        calibrations.register(s, version="base", model_version="m1", kind="temperature",
                              params={"temperature": 1.0}, threshold=0.5, source="test", actor="test")
        calibrations.register(s, version="older", model_version="m1", kind="temperature",
                              params={"temperature": 2.0}, threshold=0.6, source="test", actor="test")
        calibrations.activate(s, version="base", actor="test")
        for n, (film, logit) in enumerate(zip(fixture_images()[:2], (2.0, -2.0))):
            data = film.read_bytes()
            stored = settings.archive_dir / f"{hashlib.sha256(data).hexdigest()}.jpeg"
            shutil.copyfile(film, stored)
            study = repo.create_study(s, source_name=PATIENT_FILE if n == 0 else film.name,
                                      sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                                      stored_path=stored.relative_to(settings.data_dir).as_posix())
            with Image.open(film) as img:
                size = img.size
            Image.linear_gradient("L").resize(size).save(settings.heatmap_dir / f"{study.id}.png")
            token = repo.claim_study(s, study_id=study.id, worker="test")
            score = 1 / (1 + 2.718281828459045 ** -logit)
            assert repo.save_score(s, study_id=study.id, token=token, logit=logit, model_version="m1", score=score,
                                   threshold=0.5, calibration_version="base", width=size[0], height=size[1],
                                   heatmap_path=f"heatmaps/{study.id}.png", timings={})
            ids.append(study.id)
        repo.heartbeat(s, name="w1", model_version="m1", device="cpu")
        for role, name in USERS.items():
            auth.create_user(s, name=name, role=role, password=PASSWORD, actor="test")
        auth.create_user(s, name="zed", role="nurse", password=PASSWORD, actor="test")
    return AuthSite(settings, create_app(settings), *ids)


@pytest.fixture
def site(db_url, tmp_path) -> AuthSite:
    yield build_site(tmp_path, db_url)
    get_engine(db_url).dispose()


@pytest.fixture
def sqlite_site(tmp_path) -> AuthSite:
    from core.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'chestaid.db'}"
    upgrade(url)
    yield build_site(tmp_path, url)
    get_engine(url).dispose()


@pytest.fixture
def clients(site):
    """A started TestClient per identity: anonymous, and signed in as nurse, doctor and admin."""
    with ExitStack() as stack:
        out = {"anonymous": stack.enter_context(TestClient(site.app))}
        for role, name in USERS.items():
            out[role] = stack.enter_context(TestClient(site.app))
            sign_in(out[role], name)
        yield out


def audit_rows(settings: Settings, since: int = 0) -> list[AuditEvent]:
    with session_scope(settings.database_url) as s:
        rows = list(s.scalars(select(AuditEvent).where(AuditEvent.id > since).order_by(AuditEvent.id)))
        s.expunge_all()
    return rows


def last_audit_id(settings: Settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc()).limit(1)) or 0


# --- every route: anonymous, wrong role, right role ------------------------------------------------------------

# The access rule of every route the app serves. A new route must be added here, or the test fails.
EXPECTED = {
    ("GET", "/login"): "public",
    ("POST", "/login"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/"): "nurse",
    ("GET", "/read"): "nurse",
    ("GET", "/fragments/worklist"): "nurse",
    ("GET", "/studies/{study_id:int}"): "nurse",
    ("GET", "/studies/{study_id:int}/image"): "nurse",
    ("GET", "/studies/{study_id:int}/heatmap.png"): "nurse",
    ("GET", "/studies/{study_id:int}/reading"): "nurse",
    ("GET", "/api/studies"): "nurse",
    ("GET", "/api/studies/{study_id:int}"): "nurse",
    ("GET", "/openapi.json"): "nurse",
    ("POST", "/studies/{study_id:int}/feedback"): "doctor",
    ("POST", "/api/studies/{study_id:int}/feedback"): "doctor",
    ("GET", "/api/feedback.csv"): "admin",
    ("GET", "/admin/calibrations"): "admin",
    ("POST", "/admin/calibrations/activate"): "admin",
    ("POST", "/admin/calibrations/threshold"): "admin",
    ("GET", "/admin/users"): "admin",
    ("POST", "/admin/users"): "admin",
    ("POST", "/admin/users/{name}/disable"): "admin",
    ("POST", "/admin/users/{name}/enable"): "admin",
    ("GET", "/admin/audit"): "admin",
    ("GET", "/admin/audit.csv"): "admin",
    ("GET", "/admin/performance"): "doctor",
    ("GET", "/admin/performance.csv"): "doctor",
    ("GET", "/admin/performance/reliability.png"): "doctor",
    ("GET", "/admin/performance/scores.png"): "doctor",
    ("POST", "/admin/performance/recalibrate/preview"): "admin",
    ("GET", "/admin/performance/recalibrate/reliability.png"): "admin",
    ("POST", "/admin/performance/recalibrate/activate"): "admin",
    ("POST", "/studies/{study_id:int}/score-anyway"): "admin",
    ("POST", "/logout"): "nurse",  # last: it ends the session of the client that calls it
}


def route_requests(site: AuthSite) -> dict[tuple[str, str], Callable[[int], tuple[str, dict, int]]]:
    """A concrete, valid request per route (n varies it between calls) and its success status."""
    sid = site.flagged
    return {
        ("GET", "/login"): lambda n: ("/login", {}, 200),
        ("POST", "/login"): lambda n: ("/login", {"data": {"name": "nina", "password": PASSWORD}}, 303),
        ("GET", "/healthz"): lambda n: ("/healthz", {}, 200),
        ("GET", "/"): lambda n: ("/?view=unread", {}, 200),
        ("GET", "/read"): lambda n: ("/read", {}, 200),
        ("GET", "/fragments/worklist"): lambda n: ("/fragments/worklist?view=read", {}, 200),
        ("GET", "/studies/{study_id:int}"): lambda n: (f"/studies/{sid}", {}, 200),
        ("GET", "/studies/{study_id:int}/image"): lambda n: (f"/studies/{sid}/image", {}, 200),
        ("GET", "/studies/{study_id:int}/heatmap.png"): lambda n: (f"/studies/{sid}/heatmap.png", {}, 200),
        ("GET", "/studies/{study_id:int}/reading"): lambda n: (f"/studies/{sid}/reading", {}, 200),
        ("GET", "/api/studies"): lambda n: ("/api/studies", {}, 200),
        ("GET", "/api/studies/{study_id:int}"): lambda n: (f"/api/studies/{sid}", {}, 200),
        ("GET", "/openapi.json"): lambda n: ("/openapi.json", {}, 200),
        ("POST", "/studies/{study_id:int}/feedback"): lambda n: (
            f"/studies/{sid}/feedback", {"data": {"finding": "normal"}}, 303),
        ("POST", "/api/studies/{study_id:int}/feedback"): lambda n: (
            f"/api/studies/{sid}/feedback", {"json": {"finding": "pneumonia"}}, 200),
        ("GET", "/api/feedback.csv"): lambda n: ("/api/feedback.csv", {}, 200),
        ("GET", "/admin/calibrations"): lambda n: ("/admin/calibrations", {}, 200),
        ("POST", "/admin/calibrations/activate"): lambda n: (
            "/admin/calibrations/activate", {"data": {"version": "base"}}, 303),
        ("POST", "/admin/calibrations/threshold"): lambda n: (
            "/admin/calibrations/threshold", {"data": {"threshold": f"{0.3 + n / 100:.2f}", "confirm": "yes"}}, 303),
        ("GET", "/admin/users"): lambda n: ("/admin/users", {}, 200),
        ("POST", "/admin/users"): lambda n: ("/admin/users", {"data": {
            "name": f"new{n}", "role": "nurse", "password": PASSWORD, "password_again": PASSWORD}}, 303),
        ("POST", "/admin/users/{name}/disable"): lambda n: (
            "/admin/users/zed/disable", {"data": {"confirm": "yes"}}, 303),
        ("POST", "/admin/users/{name}/enable"): lambda n: ("/admin/users/zed/enable", {"data": {}}, 303),
        ("GET", "/admin/audit"): lambda n: ("/admin/audit?action=login_success&page=1", {}, 200),
        ("GET", "/admin/audit.csv"): lambda n: ("/admin/audit.csv", {}, 200),
        ("GET", "/admin/performance"): lambda n: ("/admin/performance", {}, 200),
        ("GET", "/admin/performance.csv"): lambda n: ("/admin/performance.csv", {}, 200),
        ("GET", "/admin/performance/reliability.png"): lambda n: ("/admin/performance/reliability.png", {}, 200),
        # The test bundle stores no reference score distribution: nothing to draw.
        ("GET", "/admin/performance/scores.png"): lambda n: ("/admin/performance/scores.png", {}, 404),
        # This site has too few reviewed cases to recalibrate: past the access rule, the refusal is the answer.
        ("POST", "/admin/performance/recalibrate/preview"): lambda n: (
            "/admin/performance/recalibrate/preview", {"data": {"window": "last", "last": "300"}}, 422),
        ("GET", "/admin/performance/recalibrate/reliability.png"): lambda n: (
            "/admin/performance/recalibrate/reliability.png?window=last&last=300", {}, 422),
        ("POST", "/admin/performance/recalibrate/activate"): lambda n: (
            "/admin/performance/recalibrate/activate", {"data": {"expected": "x", "confirm": "yes"}}, 422),
        # Only a study the image guard refused can be scored anyway; a scored one is a conflict.
        ("POST", "/studies/{study_id:int}/score-anyway"): lambda n: (f"/studies/{sid}/score-anyway", {"data": {}}, 409),
        ("POST", "/logout"): lambda n: ("/logout", {"data": {}}, 303),
    }


def send(client: TestClient, method: str, url: str, kwargs: dict):
    """Sends a request as the browser would: forms and JSON posts carry the session's CSRF token."""
    kwargs = dict(kwargs)
    if method == "POST":
        token = csrf_token(client)  # any page carries it (signed-out clients are sent on to /login)
        if "data" in kwargs:
            kwargs["data"] = {**kwargs["data"], "csrf_token": token}
        else:
            kwargs["headers"] = {"X-CSRF-Token": token}
    return client.request(method, url, follow_redirects=False, **kwargs)


def test_every_route_has_the_expected_access_rule(site, clients):
    served = {}
    for route in iter_routes(site.app):
        if not is_api_route(route):
            assert route.path == "/static", f"unexpected non-FastAPI route {route.path}"
            continue
        for method in route.methods:
            served[(method, route.path)] = route_access(route)
    assert set(served) == set(EXPECTED), "a route was added or removed: give it an access rule in EXPECTED"
    assert {key: role for key, (role, _) in served.items()} == EXPECTED
    # Every state-changing route checks the CSRF token (sign-in checks its own).
    assert {key for key, (_, csrf) in served.items() if not csrf and key[0] == "POST"} == {("POST", "/login")}
    # The OpenAPI schema, which FastAPI builds on its own, lists nothing the table lacks.
    schema_paths = {(m.upper(), p) for p, ops in site.app.openapi()["paths"].items() for m in ops}
    assert schema_paths <= {(m, re.sub(r":int}", "}", p)) for m, p in EXPECTED}

    requests = route_requests(site)
    assert set(requests) == set(EXPECTED)
    n = 0
    for (method, path), needed in EXPECTED.items():
        url, kwargs, success = requests[(method, path)](n)
        # Anonymous: the API answers 401; pages send the browser to sign in and come back.
        if needed != "public":
            r = send(clients["anonymous"], method, url, kwargs)
            if url.startswith(("/api/", "/openapi.json")):
                assert r.status_code == 401, (method, url)
                assert r.json()["detail"].startswith("sign-in required") and r.headers["www-authenticate"] == "Bearer"
            else:
                assert r.status_code == 303, (method, url)
                expected = f"/login?next={quote(url, safe='/')}" if method == "GET" else "/login"
                assert r.headers["location"] == expected, (method, url)
        for role, name in USERS.items():
            if needed != "public" and RANK[role] < RANK[needed]:
                r = send(clients[role], method, url, kwargs)
                assert r.status_code == 403, (role, method, url)
                assert f"needs the {needed} role" in r.json()["detail"], (role, method, url)
        allowed = ["anonymous"] if needed == "public" else [r for r in USERS if RANK[r] >= RANK[needed]]
        for who in allowed:
            n += 1
            url, kwargs, success = requests[(method, path)](n)
            client = TestClient(site.app) if (method, path) == ("POST", "/login") else clients[who]
            r = send(client, method, url, kwargs)
            assert r.status_code == success, (who, method, url, r.status_code, r.text[:300])
    # Public assets and the health check need no account (a fresh heartbeat: the loop above can outlast
    # worker_alive_seconds on a busy machine).
    with session_scope(site.settings.database_url) as s:
        repo.heartbeat(s, name="w1", model_version="m1", device="cpu")
    anon = clients["anonymous"]
    assert anon.get("/static/app.css").status_code == 200 and anon.get("/healthz").status_code == 200
    # The rule is checked before anything is looked up: no probing which studies exist.
    assert anon.get("/studies/99999", follow_redirects=False).status_code == 303
    assert anon.get("/api/studies/99999").status_code == 401
    assert anon.post("/api/studies/99999/feedback", json={"finding": "normal"}).status_code == 401


def test_htmx_poll_without_a_session_sends_the_browser_to_sign_in(site, clients):
    r = clients["anonymous"].get("/fragments/worklist?view=read", headers={
        "HX-Request": "true", "HX-Current-URL": "http://testserver/?view=read"})
    assert r.status_code == 401 and r.headers["hx-redirect"] == "/login?next=/%3Fview%3Dread"
    r = clients["anonymous"].get("/fragments/worklist", headers={
        "HX-Request": "true", "HX-Current-URL": "https://evil.example/phish"})
    assert r.headers["hx-redirect"] == "/login"


# --- sign-in ----------------------------------------------------------------------------------------------------


def login_error(html: str) -> str:
    return re.search(r'id="login-error">(.*?)</p>', html, re.S).group(1)


def test_login_throttling_through_the_form(site, clock):
    with TestClient(site.app) as c:
        unknown = c.post("/login", data={"name": "nobody", "password": PASSWORD, "csrf_token": csrf_token(c, "/login")})
        assert unknown.status_code == 401 and login_error(unknown.text) == SIGN_IN_FAILED
        for i in range(site.settings.login_failures_before_delay):
            r = c.post("/login", data={"name": "dora", "password": f"wrong password {i}",
                                       "csrf_token": csrf_token(c, "/login")})
            assert r.status_code == 401 and login_error(r.text) == SIGN_IN_FAILED
            assert 'value="dora"' in r.text  # the name stays filled in, the password does not
        # Now even the right password is refused unheard: this client must wait before trying this account.
        r = c.post("/login", data={"name": "dora", "password": PASSWORD, "csrf_token": csrf_token(c, "/login")})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert login_error(r.text) == THROTTLED.format(seconds=1)
        assert c.get("/", follow_redirects=False).status_code == 303  # still signed out
        # Another account from the same address is not throttled.
        sign_in(c, "nina")
    with session_scope(site.settings.database_url) as s:
        outcomes = [(a.name, a.outcome, a.client) for a in s.scalars(select(LoginAttempt).order_by(LoginAttempt.id))]
        throttled = s.scalars(select(AuditEvent).where(AuditEvent.action == audit.LOGIN_THROTTLED)).one()
        assert (throttled.actor, throttled.client, throttled.detail) == (
            "dora", "testclient", {"scope": "pair", "retry_after": 1})
    assert outcomes == [("nobody", "failure", "testclient")] + [("dora", "failure", "testclient")] * 5 + [
        ("dora", "throttled", "testclient"), ("nina", "success", "testclient")]


def test_login_without_or_with_a_wrong_csrf_token_is_refused(site):
    with TestClient(site.app) as c:
        for data in ({"name": "nina", "password": PASSWORD},
                     {"name": "nina", "password": PASSWORD, "csrf_token": "forged" * 8}):
            r = c.post("/login", data=data, follow_redirects=False)
            assert r.status_code == 403 and "sign-in form had expired" in r.text
        assert c.get("/", follow_redirects=False).status_code == 303
        with session_scope(site.settings.database_url) as s:
            assert s.scalar(select(LoginAttempt.id)) is None  # refused before the password was looked at
        sign_in(c, "nina")


def test_next_only_leads_to_this_site(site):
    cases = {"/studies/1?x=1": "/studies/1?x=1", "//evil.example/x": "/", "https://evil.example": "/",
             "/\\evil.example": "/", "javascript:alert(1)": "/", "": "/", None: "/", "/login": "/",
             "/logout": "/", "/ok\r\nSet-Cookie: x=1": "/", "studies/1": "/"}
    assert {k: safe_next(k) for k in cases} == cases
    for target, expected in (("//evil.example/", "/"), (f"/studies/{site.flagged}", f"/studies/{site.flagged}")):
        with TestClient(site.app) as c:
            page = c.get("/login", params={"next": target})
            assert f'name="next" value="{expected}"' in page.text
            r = c.post("/login", follow_redirects=False, data={
                "name": "nina", "password": PASSWORD, "next": target, "csrf_token": csrf_token(c, "/login")})
            assert r.status_code == 303 and r.headers["location"] == expected


def test_fresh_install_login_page_says_how_to_create_the_first_admin(tmp_path):
    from core.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", inbox=tmp_path / "inbox", database_url=url)
    with TestClient(create_app(settings)) as c:
        assert c.get("/", follow_redirects=False).headers["location"] == "/login"
        page = c.get("/login").text
        assert "No administrator account yet" in page and "chestaid user add NAME --role admin" in page
        with session_scope(url) as s:
            auth.create_user(s, name="root.admin", role="admin", password=PASSWORD, actor="cli:test")
        assert "No administrator account yet" not in c.get("/login").text
    get_engine(url).dispose()


def test_passwords_are_never_stored_in_clear(site, clients):
    new_password = "a brand new passphrase 42"
    r = send(clients["admin"], "POST", "/admin/users", {"data": {
        "name": "Newbie", "role": "doctor", "password": new_password, "password_again": new_password}})
    assert r.status_code == 303
    with TestClient(site.app) as c:
        bad = c.post("/login", data={"name": "newbie", "password": "typed wrong passphrase",
                                     "csrf_token": csrf_token(c, "/login")})
        assert bad.status_code == 401
        sign_in(c, "newbie", new_password)
        assert 'id="whoami-name">newbie<' in c.get("/").text
    with session_scope(site.settings.database_url) as s:
        stored = s.execute(text("SELECT password_hash FROM users WHERE name = 'newbie'")).scalar_one()
        assert stored.startswith("$argon2id$") and new_password not in stored
        everything = []
        for table in Base.metadata.sorted_tables:
            everything += [str(v) for row in s.execute(select(table)) for v in row]
    dump = "\n".join(everything)
    for secret in (new_password, "typed wrong passphrase", PASSWORD):
        assert secret not in dump


# --- sessions ---------------------------------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    """The session clock, moved by hand instead of sleeping."""
    now = [time.time()]
    monkeypatch.setattr(sessions, "now", lambda: now[0])
    return now


def test_session_idle_timeout_and_maximum_age(sqlite_site, clock):
    settings = sqlite_site.settings
    assert (settings.session_idle_minutes, settings.session_max_hours) == (30, 12)
    with TestClient(sqlite_site.app) as c:
        sign_in(c, "nina")
        for _ in range(3):  # activity keeps the session alive well past the idle timeout
            clock[0] += 29 * 60
            assert c.get("/", follow_redirects=False).status_code == 200
        clock[0] += 20 * 60  # the polling page does not count as activity...
        poll = c.get("/fragments/worklist", headers={"HX-Request": "true"})
        assert poll.status_code == 200
        clock[0] += 11 * 60  # ...so 31 minutes after the last click the session has ended
        r = c.get(f"/studies/{sqlite_site.flagged}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/login?next=/studies/{sqlite_site.flagged}"
        assert "signed out after 30 minutes without activity" in c.get(r.headers["location"]).text
        poll = c.get("/fragments/worklist", headers={"HX-Request": "true"})
        assert poll.status_code == 401 and poll.headers["hx-redirect"].startswith("/login")

        sign_in(c, "nina")
        for _ in range(24):  # 11.6 hours of steady work...
            clock[0] += 29 * 60
            assert c.get("/", follow_redirects=False).status_code == 200
        clock[0] += 29 * 60  # ...and past 12 hours the session ends, however active
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and "at most 12 hours" in c.get("/login").text


def test_password_change_or_disabling_ends_sessions(sqlite_site):
    url = sqlite_site.settings.database_url
    with TestClient(sqlite_site.app) as nina, TestClient(sqlite_site.app) as zed:
        sign_in(nina, "nina")
        sign_in(zed, "zed")
        with session_scope(url) as s:
            auth.set_password(s, name="nina", password="another passphrase!", actor="cli:test")
            auth.disable_user(s, name="zed", actor="cli:test")
        for c in (nina, zed):
            r = c.get("/", follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/login"
            assert "You have been signed out" in c.get("/login").text
        sign_in(nina, "nina", "another passphrase!")


def test_session_cookie_flags_and_signature(sqlite_site, tmp_path):
    settings = sqlite_site.settings
    with TestClient(sqlite_site.app) as c:
        cookie = c.get("/login").headers["set-cookie"]
        assert cookie.startswith("chestaid_session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Path=/" in cookie and "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
        sign_in(c, "nina")
        value = c.cookies["chestaid_session"]
        assert c.get("/", follow_redirects=False).status_code == 200
    with TestClient(sqlite_site.app) as jarless:
        # Tampering with the signed cookie signs you out, as does a cookie signed with another secret.
        assert jarless.get("/", headers={"Cookie": f"chestaid_session={value}"}).status_code == 200
        tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
        r = jarless.get("/", headers={"Cookie": f"chestaid_session={tampered}"}, follow_redirects=False)
        assert r.status_code == 303
    with TestClient(sqlite_site.app, base_url="https://testserver") as c:
        assert "Secure" in c.get("/login").headers["set-cookie"]
    forced = Settings(**{**settings.model_dump(), "force_https_cookies": True})
    with TestClient(create_app(forced)) as c:
        assert "Secure" in c.get("/login").headers["set-cookie"]
    other = Settings(**{**settings.model_dump(), "session_secret": "x" * 48})
    with TestClient(create_app(other)) as stranger:
        r = stranger.get("/", headers={"Cookie": f"chestaid_session={value}"}, follow_redirects=False)
        assert r.status_code == 303


def test_session_secret_is_generated_once_private_and_shared_by_processes(sqlite_site):
    settings = sqlite_site.settings
    path = settings.data_dir / sessions.SECRET_FILE
    assert not path.exists()
    first, second = TestClient(sqlite_site.app), TestClient(create_app(settings))  # two web processes
    with first, second:
        sign_in(first, "nina")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) >= 48
        cookie = {"Cookie": f"chestaid_session={first.cookies['chestaid_session']}"}
        assert 'id="whoami-name">nina<' in second.get("/", headers=cookie).text
    assert sessions.load_secret(settings) == path.read_text().strip()
    configured = Settings(**{**settings.model_dump(), "data_dir": settings.data_dir / "elsewhere",
                             "session_secret": "s" * 40})
    assert sessions.load_secret(configured) == "s" * 40
    assert not (configured.data_dir / sessions.SECRET_FILE).exists()


# --- roles in the pages ---------------------------------------------------------------------------------------------


def test_nurse_sees_no_feedback_form_and_the_recorded_finding_read_only(site, clients):
    nurse, doctor = clients["nurse"], clients["doctor"]
    page = nurse.get(f"/studies/{site.flagged}").text
    assert "feedback-form" not in page and 'name="finding"' not in page
    assert "No finding recorded yet. Findings are recorded by doctors." in page
    assert "/api/feedback.csv" not in page and "/admin/" not in page
    assert "feedback-form" in doctor.get(f"/studies/{site.flagged}").text
    assert send(doctor, "POST", f"/studies/{site.flagged}/feedback",
                {"data": {"finding": "pneumonia", "comment": "left base"}}).status_code == 303
    page = nurse.get(f"/studies/{site.flagged}").text
    assert "feedback-form" not in page and "To correct it" not in page
    assert re.search(r"Recorded finding: <strong>pneumonia</strong>\s+by dora", page) and "left base" in page
    admin_nav = clients["admin"].get("/").text
    for link in ("/admin/calibrations", "/admin/users", "/admin/audit", "/api/feedback.csv"):
        assert f'href="{link}"' in admin_nav


# --- CSRF -------------------------------------------------------------------------------------------------------------


def test_csrf_token_is_required_for_browser_posts(site, clients):
    doctor, admin, nurse = clients["doctor"], clients["admin"], clients["nurse"]
    url = f"/studies/{site.flagged}/feedback"
    foreign = csrf_token(nurse)  # a real token, but of another session
    for data in ({"finding": "normal"}, {"finding": "normal", "csrf_token": "wrong"},
                 {"finding": "normal", "csrf_token": foreign}):
        r = doctor.post(url, data=data, headers=HTML, follow_redirects=False)
        assert r.status_code == 403 and "CSRF check failed" in r.text and "<html" in r.text
    api = f"/api/studies/{site.flagged}/feedback"
    assert doctor.post(api, json={"finding": "normal"}).status_code == 403
    assert doctor.post(api, json={"finding": "normal"}, headers={"X-CSRF-Token": foreign}).status_code == 403
    for post in (lambda: admin.post("/admin/calibrations/activate", data={"version": "older"}),
                 lambda: admin.post("/admin/users/zed/disable"),
                 lambda: nurse.post("/logout")):
        assert post().status_code == 403
    with session_scope(site.settings.database_url) as s:
        assert repo.get_study(s, study_id=site.flagged).finding is None
        assert calibrations.active(s).version == "base" and not auth.get_user(s, name="zed").disabled
    assert nurse.get("/").status_code == 200  # still signed in
    # With the page's token the same requests go through.
    assert send(doctor, "POST", url, {"data": {"finding": "normal"}}).status_code == 303
    assert send(doctor, "POST", api, {"json": {"finding": "pneumonia"}}).json()["finding"] == "pneumonia"
    assert send(admin, "POST", "/admin/calibrations/activate", {"data": {"version": "older"}}).status_code == 303


def test_pages_send_the_csrf_token_from_static_code_only(site, clients):
    html = clients["doctor"].get(f"/studies/{site.flagged}").text
    token = csrf_token(clients["doctor"])
    assert f'<input type="hidden" name="csrf_token" value="{token}">' in html
    app_js = clients["anonymous"].get("/static/app.js").text
    assert "htmx:configRequest" in app_js and "X-CSRF-Token" in app_js and 'meta[name="csrf-token"]' in app_js


# --- API tokens -------------------------------------------------------------------------------------------------------


def test_api_token_works_without_cookies_and_stops_when_its_user_is_disabled(site, clients):
    with session_scope(site.settings.database_url) as s:
        token = auth.create_token(s, user_name="dora", label="script", actor="cli:test")
        nurse_token = auth.create_token(s, user_name="nina", label="script", actor="cli:test")
    bearer = {"Authorization": f"Bearer {token}"}
    with TestClient(site.app) as script:
        listed = script.get("/api/studies", headers=bearer)
        assert listed.status_code == 200 and {i["id"] for i in listed.json()} == {site.flagged, site.unflagged}
        assert "set-cookie" not in listed.headers
        # No CSRF token needed: a bearer token is not sent by browsers on their own.
        r = script.post(f"/api/studies/{site.flagged}/feedback", json={"finding": "normal"}, headers=bearer)
        assert r.status_code == 200 and r.json()["reviewer"] == "dora" and r.json()["outcome"] == "FP"
        assert script.get("/api/feedback.csv", headers=bearer).status_code == 403  # doctors do not export
        nurse_post = script.post(f"/api/studies/{site.flagged}/feedback", json={"finding": "normal"},
                                 headers={"Authorization": f"Bearer {nurse_token}"})
        assert nurse_post.status_code == 403
        for bad in (f"Bearer {token}x", "Bearer ", f"Basic {token}", "Bearer ca_" + "A" * 43):
            r = script.get("/api/studies", headers={"Authorization": bad})
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        # Tokens are for the API: pages still need a browser session.
        assert script.get("/", headers=bearer, follow_redirects=False).status_code == 303

        assert send(clients["admin"], "POST", "/admin/users/dora/disable", {"data": {"confirm": "yes"}}).status_code == 303
        r = script.get("/api/studies", headers=bearer)
        assert r.status_code == 401 and "disabled" in r.json()["detail"]
        # The doctor's browser session ended with the disabling too.
        assert clients["doctor"].get("/", follow_redirects=False).status_code == 303
        assert send(clients["admin"], "POST", "/admin/users/dora/enable", {"data": {}}).status_code == 303
        assert script.get("/api/studies", headers=bearer).status_code == 401  # revoked for good


# --- audit ------------------------------------------------------------------------------------------------------------


def test_audited_actions_through_http(site, clients):
    start = last_audit_id(site.settings)
    doctor, admin = clients["doctor"], clients["admin"]
    with TestClient(site.app) as c:
        c.post("/login", data={"name": "dora", "password": "not it at all", "csrf_token": csrf_token(c, "/login")})
        sign_in(c, "dora")
        assert send(c, "POST", f"/studies/{site.flagged}/feedback",
                    {"data": {"finding": "normal", "comment": "no consolidation"}}).status_code == 303
        assert send(doctor, "POST", f"/api/studies/{site.flagged}/feedback",
                    {"json": {"finding": "pneumonia"}}).status_code == 200
        export = admin.get("/api/feedback.csv")
        assert export.status_code == 200 and len(export.text.strip().splitlines()) == 2
        assert send(admin, "POST", "/admin/calibrations/activate", {"data": {"version": "older"}}).status_code == 303
        assert send(admin, "POST", "/admin/calibrations/threshold",
                    {"data": {"threshold": "0.35", "confirm": "yes"}}).status_code == 303
        assert send(admin, "POST", "/admin/users", {"data": {"name": "ivy", "role": "nurse", "password": PASSWORD,
                                                             "password_again": PASSWORD}}).status_code == 303
        assert send(admin, "POST", "/admin/users/ivy/disable", {"data": {"confirm": "yes"}}).status_code == 303
        r = send(c, "POST", "/logout", {"data": {}})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert c.get("/", follow_redirects=False).status_code == 303
    rows = [(e.action, e.actor, e.role, e.client, e.study_id, e.detail) for e in audit_rows(site.settings, start)]
    sid = site.flagged
    assert rows == [
        ("login_failure", "dora", None, "testclient", None, {"reason": "bad_password"}),
        ("login_success", "dora", "doctor", "testclient", None, {}),
        ("finding_recorded", "dora", "doctor", "testclient", sid, {"finding": "normal"}),
        ("finding_changed", "dora", "doctor", "testclient", sid, {"old": "normal", "new": "pneumonia"}),
        ("export_downloaded", "adam", "admin", "testclient", None, {"rows": 1}),
        ("calibration_activated", "adam", "admin", "testclient", None,
         {"version": "older", "previous": "base", "rescored": 2}),
        ("threshold_changed", "adam", "admin", "testclient", None,
         {"old": 0.6, "new": 0.35, "version": "older@t0.3500", "previous": "older", "rescored": 2}),
        ("user_created", "adam", "admin", "testclient", None, {"user": "ivy", "user_role": "nurse"}),
        ("user_disabled", "adam", "admin", "testclient", None, {"user": "ivy", "tokens_revoked": 0}),
        ("logout", "dora", "doctor", "testclient", None, {}),
    ]
    assert "no consolidation" not in json.dumps([r[5] for r in rows])  # comments stay out of the trail
    with session_scope(site.settings.database_url) as s:
        active = calibrations.active(s)
        assert (active.version, active.threshold, active.kind, active.params) == (
            "older@t0.3500", 0.35, "temperature", {"temperature": 2.0})
        assert {c.version for c in s.scalars(select(Calibration))} == {"base", "older", "older@t0.3500"}
        study = repo.get_study(s, study_id=sid)
        assert study.threshold == 0.35 and study.calibration_version == "older@t0.3500"


def test_admin_pages_browse_the_trail_and_report_mistakes(site, clients):
    admin = clients["admin"]
    page = admin.get("/admin/audit?action=login_success").text
    rows = re.findall(r'<tr data-event-id="\d+">.*?</tr>', page, re.S)
    assert len(rows) == 3 and all("login_success" in r for r in rows)  # nina, dora and adam signed in
    assert "3 events matching; page 1 of 1." in page
    assert re.findall(r"<td>(\w+)</td>\s*<td>\w+</td>\s*<td>testclient</td>", page) == ["adam", "dora", "nina"]
    assert "1 event matching" in admin.get("/admin/audit?actor=dora&action=login_success").text
    assert admin.get("/admin/audit?action=bogus").status_code == 422
    for i in range(60):  # two pages of events
        with session_scope(site.settings.database_url) as s:
            audit.record(s, actor=f"cli:t{i}", action=audit.AUDIT_EXPORTED, destination="file")
    first = admin.get("/admin/audit?action=audit_exported").text
    assert "page 1 of 2" in first and 'href="/admin/audit?action=audit_exported&amp;page=2"' in first
    second = admin.get("/admin/audit?action=audit_exported&page=2").text
    assert len(re.findall(r"<tr data-event-id=", second)) == 10 and "cli:t0" in second
    csv_text = admin.get("/admin/audit.csv")
    assert csv_text.headers["content-disposition"] == 'attachment; filename="chestaid-audit.csv"'
    assert csv_text.text.splitlines()[0] == ",".join(audit.COLUMNS) and "cli:t59" in csv_text.text
    last = audit_rows(site.settings)[-1]
    assert (last.action, last.actor, last.detail) == (audit.AUDIT_EXPORTED, "adam", {"destination": "download"})

    def post(url, data):
        return send(admin, "POST", url, {"data": data})

    assert post("/admin/users", {"name": "nina", "role": "nurse", "password": PASSWORD,
                                 "password_again": PASSWORD}).status_code == 422
    assert post("/admin/users", {"name": "x", "role": "root", "password": PASSWORD,
                                 "password_again": PASSWORD}).status_code == 422
    assert post("/admin/users", {"name": "x", "role": "nurse", "password": "short", "password_again": "short"}
                ).status_code == 422
    assert post("/admin/users", {"name": "x", "role": "nurse", "password": PASSWORD,
                                 "password_again": PASSWORD + "!"}).status_code == 422
    assert post("/admin/users/adam/disable", {}).status_code == 409  # not yourself
    assert post("/admin/users/ghost/disable", {}).status_code == 404
    for bad in ("0", "1", "-0.2", "abc", "nan"):
        assert post("/admin/calibrations/threshold", {"threshold": bad}).status_code == 422
    assert post("/admin/calibrations/activate", {"version": "nope"}).status_code == 404
    r = post("/admin/calibrations/threshold", {"threshold": "0.5", "confirm": "yes"})  # in force: nothing to do
    assert r.status_code == 303 and "nothing changed" in admin.get("/admin/calibrations").text
    with session_scope(site.settings.database_url) as s:
        assert [u.name for u in auth.list_users(s)] == ["adam", "dora", "nina", "zed"]
        assert not auth.get_user(s, name="adam").disabled and calibrations.active(s).version == "base"
    page = admin.get("/admin/calibrations").text
    assert re.search(r'<tr data-version="base" class="row-active">', page) and "IN FORCE" in page
    assert 'name="version" value="older"' in page


# --- headers and hygiene ----------------------------------------------------------------------------------------------


def assert_security_headers(r) -> None:
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_security_headers_on_every_kind_of_answer(site, clients):
    nurse, anon = clients["nurse"], clients["anonymous"]
    answers = [nurse.get("/"), nurse.get("/api/studies"), nurse.get(f"/studies/{site.flagged}/image"),
               anon.get("/static/app.js"), anon.get("/login"), anon.get("/", follow_redirects=False),
               anon.get("/api/studies"), nurse.get("/admin/users"), nurse.get("/no/such/page"), anon.get("/healthz")]
    for r in answers:
        assert_security_headers(r)
    assert answers[0].headers["cache-control"] == "no-store"  # pages with patient data are not cached


def test_pages_have_no_inline_script_or_handlers(site, clients):
    admin = clients["admin"]
    pages = [admin.get(u).text for u in ("/", "/read", f"/studies/{site.flagged}", "/admin/calibrations",
                                         "/admin/users", "/admin/audit")]
    pages.append(clients["anonymous"].get("/login").text)
    templates = [p.read_text() for p in Path("web/templates").glob("*.html")]
    for html in pages + templates:
        assert not re.search(r"\son[a-z]+\s*=", html, re.I), "inline event handler"
        assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", html), "inline script"
        assert " style=" not in html and "javascript:" not in html


def test_health_check_is_public_and_names_no_error(site, tmp_path, caplog):
    broken = Settings(**{**site.settings.model_dump(), "broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c, caplog.at_level(logging.WARNING, logger="chestaid.web.health"):
        r = c.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "unavailable"}  # public: the status alone
    assert "127.0.0.1" not in r.text and "Error" not in r.text
    assert "broker unavailable" in caplog.text  # the reason is in the server log


def test_oversized_request_bodies_are_refused(sqlite_site):
    small = Settings(**{**sqlite_site.settings.model_dump(), "max_request_bytes": 1024})
    app = create_app(small)
    with TestClient(app) as c:
        assert small.max_request_bytes == 1024 and Settings().max_request_bytes == 1_048_576
        r = c.post("/login", data={"name": "nina", "password": "x" * 2000, "csrf_token": csrf_token(c, "/login")})
        assert r.status_code == 413 and r.json() == {"detail": "request body too large (the limit is 1024 bytes)"}
        assert_security_headers(r)
        ok = c.post("/login", data={"name": "nina", "password": PASSWORD, "csrf_token": csrf_token(c, "/login")},
                    follow_redirects=False)
        assert ok.status_code == 303
        assert c.post("/api/studies/1/feedback", content=b"{}", headers={"Content-Length": "12x"}).status_code == 400
    # A chunked upload declares no length: it is cut off once it passes the limit (real server, real socket).
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # One write: were the last chunk sent after the server had answered and closed, the write could
            # meet a reset (and a reset can drop the reply still unread here).
            sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
                         + (b"258\r\n" + b"a" * 600 + b"\r\n") * 3 + b"0\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply and (part := sock.recv(4096)):
                reply += part
        assert reply.startswith(b"HTTP/1.1 413 ")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_are_generic_and_logs_carry_no_patient_identifiers(sqlite_site, monkeypatch, caplog):
    import web.api
    import web.pages

    caplog.set_level(logging.DEBUG)
    with TestClient(sqlite_site.app) as c:  # no exception may escape the app, so none is raised here
        sign_in(c, "dora")
        assert send(c, "POST", f"/studies/{sqlite_site.flagged}/feedback",
                    {"data": {"finding": "pneumonia", "comment": "Mr Doe, bed 12"}}).status_code == 303
        assert PATIENT_FILE in c.get("/read").text  # the worklist shows it to signed-in staff...

        def boom(*args, **kwargs):
            raise RuntimeError(f"secret internals of {PATIENT_FILE}")

        monkeypatch.setattr(web.pages.wl, "status_strip", boom)
        page = c.get("/", headers=HTML)
        assert page.status_code == 500 and "Something went wrong" in page.text and "<html" in page.text
        monkeypatch.setattr(web.api.wl, "section", boom)
        api = c.get("/api/studies")
        assert api.status_code == 500 and api.json() == {
            "detail": "internal error: the problem has been logged on the server"}
        for r in (page, api):
            assert "Traceback" not in r.text and "secret internals" not in r.text and "RuntimeError" not in r.text
            assert_security_headers(r)
    assert "unhandled RuntimeError on GET /api/studies" in caplog.text and "in boom" in caplog.text
    assert PATIENT_FILE not in caplog.text and "Mr Doe" not in caplog.text  # ...the log never does
