"""Session and sign-in hardening over HTTP, on migrated SQLite and Postgres: sign-out revokes copied cookies
server-side, sign-in throttling slows one client for one account without locking the owner out, and
X-Forwarded-For is believed only from a trusted proxy."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core import audit, auth
from core.db import get_engine, session_scope
from core.models import AuditEvent, LoginAttempt
from tests.test_web import PASSWORD, csrf_token, sign_in
from tests.test_web_auth import build_site, login_error, send
from web import sessions
from web.deps import forwarded_client
from web.login import SIGN_IN_FAILED, THROTTLED

ATTACKER, OWNER = ("198.51.100.7", 40000), ("192.0.2.10", 40000)


@pytest.fixture
def clock(monkeypatch):
    """The web clock (sessions and sign-in throttling), moved by hand instead of sleeping."""
    now = [time.time() + 600]  # ahead of the real time: the test's accounts, created later, must predate sessions
    monkeypatch.setattr(sessions, "now", lambda: now[0])
    return now


def throttle_events(url: str) -> list[tuple[str, str, dict]]:
    with session_scope(url) as s:
        return [(e.actor, e.client, e.detail) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == audit.LOGIN_THROTTLED).order_by(AuditEvent.id))]


def post_login(client: TestClient, name: str, password: str):
    return client.post("/login", follow_redirects=False,
                       data={"name": name, "password": password, "csrf_token": csrf_token(client, "/login")})


def test_a_copied_cookie_stops_working_after_sign_out(db_url, tmp_path):
    site = build_site(tmp_path, db_url)
    with TestClient(site.app) as browser, TestClient(site.app) as laptop, TestClient(site.app) as thief:
        sign_in(browser, "nina")
        sign_in(laptop, "nina")
        stolen = {"Cookie": f"chestaid_session={browser.cookies['chestaid_session']}"}
        assert 'id="whoami-name">nina<' in thief.get("/", headers=stolen).text  # a copy works while signed in
        assert thief.get("/api/studies", headers=stolen).status_code == 200

        r = send(browser, "POST", "/logout", {"data": {}})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        # The copy taken before sign-out is refused: pages send it to sign in, the API answers 401.
        r = thief.get("/", headers=stolen, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        api = thief.get("/api/studies", headers=stolen)
        assert api.status_code == 401 and api.json()["detail"].startswith("sign-in required")
        # Signing out ends every session of the user: the laptop's too.
        assert laptop.get("/", follow_redirects=False).status_code == 303
        with session_scope(db_url) as s:
            assert auth.get_user(s, name="nina").session_generation == 1
            assert auth.get_user(s, name="dora").session_generation == 0  # nobody else's
        # A fresh sign-in works, and the old copy stays dead.
        sign_in(browser, "nina")
        assert browser.get("/", follow_redirects=False).status_code == 200
        assert thief.get("/", headers=stolen, follow_redirects=False).status_code == 303
        # A password change moves the generation on as well, whatever the clocks say.
        with session_scope(db_url) as s:
            auth.set_password(s, name="nina", password="a different passphrase", actor="cli:test")
            assert auth.get_user(s, name="nina").session_generation == 2
        assert browser.get("/", follow_redirects=False).status_code == 303
    get_engine(db_url).dispose()


def test_attacker_client_waits_ever_longer_while_the_owner_signs_in_elsewhere(db_url, tmp_path, clock):
    site = build_site(tmp_path, db_url)
    free = site.settings.login_failures_before_delay
    with TestClient(site.app, client=ATTACKER) as attacker, TestClient(site.app, client=OWNER) as owner:
        for i in range(free):
            r = post_login(attacker, "dora", f"guess number {i}")
            assert r.status_code == 401 and login_error(r.text) == SIGN_IN_FAILED
        waits = []
        for n in range(4):
            r = post_login(attacker, "dora", PASSWORD)  # too early: refused unheard, right password or not
            assert r.status_code == 429 and login_error(r.text) == THROTTLED.format(seconds=r.headers["retry-after"])
            waits.append(int(r.headers["retry-after"]))
            clock[0] += waits[-1] - 0.5
            assert post_login(attacker, "dora", PASSWORD).status_code == 429  # half a second short
            # The owner, from another client, is never held up.
            sign_in(owner, "dora")
            assert 'id="whoami-name">dora<' in owner.get("/").text
            clock[0] += 0.5
            assert post_login(attacker, "dora", f"late guess {n}").status_code == 401  # on time: heard, wrong
        assert waits == [1, 2, 4, 8]
        assert int(post_login(attacker, "dora", PASSWORD).headers["retry-after"]) == 16
        # The attacker client may still sign in to other accounts: only its pair with dora is slowed.
        sign_in(attacker, "nina")
    events = throttle_events(db_url)
    assert {(actor, client, d["scope"]) for actor, client, d in events} == {("dora", ATTACKER[0], "pair")}
    assert [d["retry_after"] for _, _, d in events] == [1, 1, 2, 1, 4, 1, 8, 1, 16]
    with session_scope(db_url) as s:
        owner_attempts = list(s.scalars(select(LoginAttempt.outcome).where(LoginAttempt.client == OWNER[0])))
    assert owner_attempts == ["success"] * 4
    get_engine(db_url).dispose()


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(db_url, tmp_path, clock):
    site = build_site(tmp_path, db_url, trusted_proxies=["10.0.0.0/8"])
    proxy = ("10.0.0.2", 40000)
    via_proxy = {"X-Forwarded-For": "203.0.113.5"}
    # The client forges a left-most hop; the proxy appends the address it really saw.
    forged = {"X-Forwarded-For": "192.0.2.99, 203.0.113.66"}
    with TestClient(site.app, client=proxy, headers=via_proxy) as owner, \
            TestClient(site.app, client=proxy, headers=forged) as attacker, \
            TestClient(site.app, client=ATTACKER, headers=via_proxy) as direct:
        for i in range(site.settings.login_failures_before_delay):
            assert post_login(attacker, "adam", f"guess number {i}").status_code == 401
        r = post_login(attacker, "adam", PASSWORD)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        # Behind the same proxy, the owner is another client: not throttled.
        sign_in(owner, "adam")
        # A client not behind a trusted proxy cannot pick its address by sending the header.
        sign_in(direct, "nina")
        send(direct, "POST", "/logout", {"data": {}})
    with session_scope(db_url) as s:
        attempts = [(a.name, a.client, a.outcome) for a in s.scalars(select(LoginAttempt).order_by(LoginAttempt.id))]
        logout = s.scalars(select(AuditEvent).where(AuditEvent.action == audit.LOGOUT)).one()
    assert attempts == [("adam", "203.0.113.66", "failure")] * 5 + [
        ("adam", "203.0.113.66", "throttled"), ("adam", "203.0.113.5", "success"), ("nina", ATTACKER[0], "success")]
    assert (logout.actor, logout.client) == ("nina", ATTACKER[0])  # the audit trail uses the same address
    get_engine(db_url).dispose()


@pytest.mark.parametrize("peer, header, expected", [
    ("10.0.0.2", ["203.0.113.5"], "203.0.113.5"),
    ("10.0.0.2", ["192.0.2.99, 203.0.113.5"], "203.0.113.5"),  # right-most untrusted, not the forged left
    ("10.0.0.2", ["203.0.113.5", "10.0.0.3"], "203.0.113.5"),  # two header lines, a chain of trusted proxies
    ("10.0.0.2", ["[2001:db8::7]:443"], "2001:db8::7"),
    ("10.0.0.2", ["203.0.113.5:51000"], "203.0.113.5"),
    ("10.0.0.2", ["not-an-address, 10.0.0.3"], "10.0.0.3"),  # a malformed hop: stop at the last known one
    ("10.0.0.2", [], "10.0.0.2"),
    ("198.51.100.7", ["203.0.113.5"], "198.51.100.7"),  # untrusted peer: the header is ignored
    ("testclient", ["203.0.113.5"], "testclient"),
])
def test_forwarded_client_takes_the_right_most_untrusted_hop(peer, header, expected):
    assert forwarded_client(peer, header, trusted_proxies=["10.0.0.0/8", "::1"]) == expected
    assert forwarded_client(peer, header, trusted_proxies=[]) == peer

