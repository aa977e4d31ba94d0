"""Sign-in throttling by growing delays, counted in the database so it holds across web processes.

There is no lock-out: a hard per-account limit would let anyone lock any account by typing five wrong
passwords. Instead each (account, client) pair gets a few free failures, then every further try from that
client for that account must wait an exponentially growing delay after its last failure. The owner signing
in from another client is unaffected. A per-client cap across all accounts stops one client spraying guesses
at many accounts.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import LoginAttempt
from core.settings import Settings

PAIR = "pair"  # this client, this account
CLIENT = "client"  # this client, all accounts


@dataclass(frozen=True)
class Throttle:
    """Why a sign-in attempt is refused unheard, and for how many more seconds."""

    scope: str  # PAIR or CLIENT
    retry_after: float


def pair_delay(failures: int, *, settings: Settings) -> float:
    """Returns the wait (seconds) after the last failure once a pair has `failures` recent failures.

    No wait for the first login_failures_before_delay failures; then base, 2·base, 4·base, … up to the max.
    """
    extra = failures - settings.login_failures_before_delay
    if extra < 0:
        return 0.0
    # Capped before exponentiating: a long-running attack must not overflow the float.
    return min(settings.login_delay_base_seconds * 2.0 ** min(extra, 64), settings.login_delay_max_seconds)


def _pair_wait(session: Session, *, name: str, client: str, now: dt.datetime, settings: Settings) -> float:
    since = now - dt.timedelta(seconds=settings.login_failure_memory_seconds)
    # A success from this client for this account clears the pair's count.
    last_ok = session.scalar(select(func.max(LoginAttempt.at)).where(
        LoginAttempt.name == name, LoginAttempt.client == client, LoginAttempt.outcome == "success",
        LoginAttempt.at <= now))
    if last_ok is not None:
        since = max(since, last_ok)
    count, last_failure = session.execute(select(func.count(LoginAttempt.id), func.max(LoginAttempt.at)).where(
        LoginAttempt.name == name, LoginAttempt.client == client, LoginAttempt.outcome == "failure",
        LoginAttempt.at > since, LoginAttempt.at <= now)).one()
    if not count:
        return 0.0
    until = last_failure + dt.timedelta(seconds=pair_delay(count, settings=settings))
    return max(0.0, (until - now).total_seconds())


def _client_wait(session: Session, *, client: str, now: dt.datetime, settings: Settings) -> float:
    window = dt.timedelta(seconds=settings.login_throttle_window_seconds)
    recent = select(LoginAttempt.at).where(LoginAttempt.client == client, LoginAttempt.outcome == "failure",
                                           LoginAttempt.at > now - window, LoginAttempt.at <= now)
    count = session.scalar(select(func.count()).select_from(recent.subquery()))
    cap = settings.login_max_failures_per_client
    if count < cap:
        return 0.0
    # The client may try again once enough of its failures have left the window to bring it under the cap.
    freeing = session.scalar(recent.order_by(LoginAttempt.at).offset(count - cap).limit(1))
    return max(0.0, (freeing + window - now).total_seconds())


def check(session: Session, *, name: str, client: str, now: dt.datetime, settings: Settings) -> Throttle | None:
    """Returns the throttle that refuses this attempt now (the longer wait if both apply), or None."""
    waits = [(_pair_wait(session, name=name, client=client, now=now, settings=settings), PAIR),
             (_client_wait(session, client=client, now=now, settings=settings), CLIENT)]
    wait, scope = max(waits)
    return Throttle(scope=scope, retry_after=wait) if wait > 0 else None
