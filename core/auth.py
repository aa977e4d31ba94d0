"""Accounts, roles, sign-in with throttling, and API tokens (keyword-only repository functions, no commits).

Every change to an account writes an audit row in the same transaction, so none can happen untraced.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import audit, login_throttle
from core.models import ApiToken, LoginAttempt, User, utcnow
from core.settings import Settings

ROLES = ("nurse", "doctor", "admin")  # each role may do everything the ones before it may
_RANK = {role: rank for rank, role in enumerate(ROLES)}
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # bounds the hashing work an anonymous request can cause
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")  # no ':' so a name never looks like "cli:…"
INVALID_NAME = "?"  # what the trail shows for an unusable login name (it may be a mistyped password)
TOKEN_PREFIX = "ca_"

_hasher = PasswordHasher()
_dummy_hash: str | None = None


class AuthError(ValueError):
    """Raised for an unknown or duplicate user, a bad role, or an unacceptable password."""


def role_allows(role: str | None, needed: str) -> bool:
    """Tells whether role may do what needs `needed` (nurse < doctor < admin)."""
    if needed not in _RANK:
        raise ValueError(f"unknown role {needed!r}")
    return role in _RANK and _RANK[role] >= _RANK[needed]


def normalize_name(name: str) -> str:
    """Returns the canonical (lower-case) form of a user name, or raises AuthError if it is unusable."""
    canonical = (name or "").strip().lower()
    if not NAME_PATTERN.match(canonical):
        raise AuthError("user names are 1-64 characters: letters, digits, '.', '_', '@', '-' "
                        "(starting with a letter or digit)")
    return canonical


def check_password_policy(password: str) -> None:
    """Raises AuthError if the password is too short or too long."""
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise AuthError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AuthError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")


def _check_role(role: str) -> str:
    if role not in _RANK:
        raise AuthError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
    return role


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _burn_hash_time(password: str) -> None:
    """Verifies against a throwaway hash so an unknown name costs as long as a wrong password."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hasher.hash(secrets.token_urlsafe(16))
    _verify(_dummy_hash, password)


def get_user(session: Session, *, name: str) -> User | None:
    """Returns the user with this name (any case), or None."""
    try:
        canonical = normalize_name(name)
    except AuthError:
        return None
    return session.scalars(select(User).where(User.name == canonical)).first()


def get_user_by_id(session: Session, *, user_id: int) -> User | None:
    """Returns the user with this id, or None."""
    return session.get(User, user_id)


def _require_user(session: Session, name: str) -> User:
    user = get_user(session, name=name)
    if user is None:
        raise AuthError(f"no user named {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    """Returns all users by name."""
    return list(session.scalars(select(User).order_by(User.name)))


def has_admin(session: Session) -> bool:
    """Tells whether an enabled admin exists (a fresh install has none and no default account)."""
    query = select(func.count(User.id)).where(User.role == "admin", User.disabled.is_(False))
    return bool(session.scalar(query))


def create_user(session: Session, *, name: str, role: str, password: str, actor: str,
                actor_role: str | None = None, client: str | None = None) -> User:
    """Adds an enabled user with an argon2-hashed password and audits it."""
    canonical = normalize_name(name)
    _check_role(role)
    check_password_policy(password)
    if get_user(session, name=canonical) is not None:
        raise AuthError(f"a user named {canonical!r} already exists")
    user = User(name=canonical, role=role, password_hash=_hasher.hash(password), disabled=False,
                created_at=utcnow(), password_changed_at=utcnow())
    session.add(user)
    session.flush()
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.USER_CREATED,
                 user=canonical, user_role=role)
    return user


def end_sessions(user: User) -> None:
    """Voids every web session the user holds: cookies carry the generation they were issued in."""
    # Incremented in SQL at flush, so two concurrent sign-outs cannot both write the same generation.
    user.session_generation = User.session_generation + 1


def sign_out(session: Session, *, user: User, client: str | None) -> None:
    """Ends all of the user's web sessions (a copied cookie dies too) and audits the sign-out."""
    end_sessions(user)
    session.flush()
    audit.record(session, actor=user.name, role=user.role, client=client, action=audit.LOGOUT)


def set_password(session: Session, *, name: str, password: str, actor: str, actor_role: str | None = None,
                 client: str | None = None) -> User:
    """Replaces a user's password (voiding their web sessions) and audits it."""
    user = _require_user(session, name)
    check_password_policy(password)
    user.password_hash = _hasher.hash(password)
    user.password_changed_at = utcnow()
    end_sessions(user)
    session.flush()
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.PASSWORD_CHANGED,
                 user=user.name)
    return user


def disable_user(session: Session, *, name: str, actor: str, actor_role: str | None = None,
                 client: str | None = None) -> User:
    """Disables a user, ends their web sessions and revokes their API tokens, so re-enabling revives neither."""
    user = _require_user(session, name)
    user.disabled = True
    end_sessions(user)
    now = utcnow()
    tokens = session.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)))
    revoked = 0
    for token in tokens:
        token.revoked_at = now
        revoked += 1
    session.flush()
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.USER_DISABLED,
                 user=user.name, tokens_revoked=revoked)
    return user


def enable_user(session: Session, *, name: str, actor: str, actor_role: str | None = None,
                client: str | None = None) -> User:
    """Re-enables a disabled user and audits it."""
    user = _require_user(session, name)
    user.disabled = False
    session.flush()
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.USER_ENABLED, user=user.name)
    return user


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in attempt: the user, or None; when throttled, how long before trying again."""

    user: User | None
    retry_after: float | None = None  # seconds; set only when the attempt was refused unheard


def authenticate(session: Session, *, name: str, password: str, client: str | None, settings: Settings,
                 now: dt.datetime | None = None) -> SignIn:
    """Checks a name and password; returns SignIn with the user if both are right, else with None.

    Every refusal looks alike (unknown name, wrong password, disabled) except a throttled one, which says
    how long to wait (core.login_throttle); while throttled the password is not even checked. Records the
    attempt for throttling and audits it.
    """
    now = now or utcnow()
    client = (client or "unknown")[:255]
    try:
        attempted = normalize_name(name)
    except AuthError:
        attempted = INVALID_NAME

    def _log(outcome: str, action: str, role: str | None = None, **detail) -> None:
        session.add(LoginAttempt(at=now, name=attempted, client=client, outcome=outcome))
        audit.record(session, actor=attempted, role=role, client=client, action=action, at=now, **detail)

    throttle = login_throttle.check(session, name=attempted, client=client, now=now, settings=settings)
    if throttle is not None:
        _log("throttled", audit.LOGIN_THROTTLED, scope=throttle.scope,
             retry_after=math.ceil(throttle.retry_after))
        return SignIn(None, retry_after=throttle.retry_after)
    if len(password or "") > MAX_PASSWORD_LENGTH:
        _log("failure", audit.LOGIN_FAILURE, reason="password_too_long")
        return SignIn(None)
    user = None if attempted == INVALID_NAME else get_user(session, name=attempted)
    if user is None:
        _burn_hash_time(password or "")
        _log("failure", audit.LOGIN_FAILURE, reason="unknown_user")
        return SignIn(None)
    if not _verify(user.password_hash, password or ""):
        _log("failure", audit.LOGIN_FAILURE, reason="bad_password")
        return SignIn(None)
    if user.disabled:
        _log("failure", audit.LOGIN_FAILURE, reason="disabled")
        return SignIn(None)
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = now
    _log("success", audit.LOGIN_SUCCESS, role=user.role)
    session.flush()
    return SignIn(user)


def _token_hash(token: str) -> str:
    # A fast hash suffices: tokens carry 256 random bits, so there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, *, user_name: str, label: str = "", actor: str,
                 actor_role: str | None = None, client: str | None = None) -> str:
    """Creates an API token for an enabled user and returns it in clear, the only time it exists so."""
    user = _require_user(session, user_name)
    if user.disabled:
        raise AuthError(f"user {user.name!r} is disabled")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, label=(label or "")[:255], token_hash=_token_hash(token),
                   prefix=token[:8], created_at=utcnow())
    session.add(row)
    session.flush()
    audit.record(session, actor=actor, role=actor_role, client=client, action=audit.TOKEN_CREATED,
                 user=user.name, token_id=row.id, label=row.label)
    return token


def user_for_token(session: Session, *, token: str, now: dt.datetime | None = None) -> User | None:
    """Returns the enabled user holding this unrevoked token (noting its use), else None."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                          .where(ApiToken.token_hash == _token_hash(token))).first()
    if row is None:
        return None
    api_token, user = row
    if api_token.revoked_at is not None or user.disabled:
        return None
    api_token.last_used_at = now or utcnow()
    session.flush()
    return user


def list_tokens(session: Session, *, user_name: str | None = None) -> list[tuple[ApiToken, str]]:
    """Returns (token row, user name) pairs, optionally for one user; never the tokens themselves."""
    query = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id)
    if user_name is not None:
        query = query.where(User.id == _require_user(session, user_name).id)
    return [(t, n) for t, n in session.execute(query)]


def revoke_token(session: Session, *, token_id: int, actor: str, actor_role: str | None = None,
                 client: str | None = None) -> ApiToken:
    """Revokes a token by id and audits it."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise AuthError(f"no token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        audit.record(session, actor=actor, role=actor_role, client=client, action=audit.TOKEN_REVOKED,
                     token_id=row.id)
    return row
