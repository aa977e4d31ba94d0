"""Signed-cookie sessions: who signed in and when, the CSRF token, and a one-shot notice for the next page.

The cookie holds no secret and nothing about patients: a user id, the user's session generation, two times, a
random CSRF token. It is signed (itsdangerous, HMAC) so it cannot be forged; each request re-checks the user in
the database, and a cookie from an older generation (the user signed out since) is refused.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.secretfile import load_or_create
from core.settings import Settings

log = logging.getLogger("chestaid.web.sessions")

COOKIE = "chestaid_session"
SECRET_FILE = "session_secret"
SCOPE_KEY = "chestaid.session"
_SALT = "chestaid.session.v1"
# The last-seen time is rewritten at most this often, so not every image request sets a cookie.
SEEN_REFRESH_SECONDS = 60


def now() -> float:
    """Returns the current time in seconds (tests move this clock instead of sleeping)."""
    return time.time()


def load_secret(settings: Settings) -> str:
    """Returns CHESTAID_SESSION_SECRET, else the secret kept under data_dir (created once, mode 0600).

    Every web process on one machine reads the same file, so a session signed by one is valid in all.
    """
    configured = settings.session_secret.get_secret_value()
    if configured:
        return configured
    return load_or_create(settings.data_dir / SECRET_FILE, what="session secret",
                          lost_hint="delete it to generate a new one", nbytes=48)


class SessionState:
    """The decoded session of one request; changes are written back as a cookie with the response."""

    def __init__(self, data: dict[str, Any] | None = None):
        self.data: dict[str, Any] = data or {}
        self.modified = False

    @property
    def user_id(self) -> int | None:
        uid = self.data.get("uid")
        return uid if isinstance(uid, int) else None

    @property
    def generation(self) -> int:
        """The user's session generation when this session began; a sign-out anywhere moves it on."""
        gen = self.data.get("gen", 0)
        return gen if isinstance(gen, int) else -1

    @property
    def issued_at(self) -> float:
        return float(self.data.get("iat", 0.0))

    @property
    def seen_at(self) -> float:
        return float(self.data.get("seen", 0.0))

    def csrf_token(self) -> str:
        """Returns this session's CSRF token, creating one if there is none yet."""
        token = self.data.get("csrf")
        if not isinstance(token, str) or len(token) < 32:
            token = self.data["csrf"] = secrets.token_urlsafe(32)
            self.modified = True
        return token

    def start(self, user_id: int, *, generation: int) -> None:
        """Signs a user in with a fresh session (new CSRF token: nothing from before sign-in carries over).

        generation is the user's current session generation (users.session_generation); the session is
        void once it moves on (sign-out, password change, disabling), even if someone kept a copy of the cookie.
        """
        t = now()
        self.data = {"uid": user_id, "gen": generation, "iat": t, "seen": t, "csrf": secrets.token_urlsafe(32)}
        self.modified = True

    def touch(self) -> None:
        """Notes activity, which pushes the idle timeout back."""
        t = now()
        if t - self.seen_at >= SEEN_REFRESH_SECONDS:
            self.data["seen"] = t
            self.modified = True

    def end(self, notice: str | None = None) -> None:
        """Signs out: keeps nothing but a new CSRF token and an optional notice for the sign-in page."""
        self.data = {"csrf": secrets.token_urlsafe(32)}
        if notice:
            self.data["notice"] = notice
        self.modified = True

    def set_notice(self, text: str) -> None:
        """Leaves a short message for the next page shown (after a redirect)."""
        self.data["notice"] = text
        self.modified = True

    def pop_notice(self) -> str | None:
        """Returns and forgets the pending notice."""
        text = self.data.pop("notice", None)
        if text is not None:
            self.modified = True
        return text if isinstance(text, str) else None


def session_of(conn: HTTPConnection) -> SessionState:
    """Returns the session the middleware attached to this request."""
    return conn.scope[SCOPE_KEY]


class SessionMiddleware:
    """Reads the signed session cookie into the scope; writes it back when the request changed it.

    Signed-in sessions end after settings.session_idle_minutes without activity and session_max_hours
    after sign-in. The cookie is HttpOnly, SameSite=Lax, and Secure over HTTPS (or with force_https_cookies).
    """

    def __init__(self, app: ASGIApp, settings_for: Callable[[Any], Settings]):
        self.app = app
        self.settings_for = settings_for

    def _serializer(self, app: Any, settings: Settings) -> URLSafeTimedSerializer:
        serializer = getattr(app.state, "session_serializer", None)
        if serializer is None:
            serializer = app.state.session_serializer = URLSafeTimedSerializer(load_secret(settings), salt=_SALT)
        return serializer

    def _load(self, raw: str | None, serializer: URLSafeTimedSerializer, settings: Settings) -> SessionState:
        if not raw:
            return SessionState()
        try:
            data = serializer.loads(raw, max_age=settings.session_max_hours * 3600 + SEEN_REFRESH_SECONDS)
        except BadSignature:  # forged, from another secret, or older than any session may live
            state = SessionState()
            state.modified = True
            return state
        if not isinstance(data, dict):
            return SessionState()
        state = SessionState(data)
        if state.user_id is not None:
            t = now()
            if t - state.seen_at > settings.session_idle_minutes * 60:
                state.end(f"You were signed out after {settings.session_idle_minutes} minutes without activity. "
                          "Please sign in again.")
            elif t - state.issued_at > settings.session_max_hours * 3600:
                state.end(f"Sessions last at most {settings.session_max_hours} hours. Please sign in again.")
        return state

    def _cookie(self, value: str, scope: Scope, settings: Settings) -> str:
        parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
        if scope.get("scheme") == "https" or settings.force_https_cookies:
            parts.append("Secure")
        return "; ".join(parts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings_for(scope["app"])
        serializer = self._serializer(scope["app"], settings)
        state = self._load(Request(scope).cookies.get(COOKIE), serializer, settings)
        scope[SCOPE_KEY] = state

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and state.modified:
                MutableHeaders(scope=message).append("Set-Cookie",
                                                     self._cookie(serializer.dumps(state.data), scope, settings))
            await send(message)

        await self.app(scope, receive, send_with_cookie)
