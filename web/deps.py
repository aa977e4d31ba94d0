"""Request dependencies: the app's settings and a per-request database session."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from core import repository as repo
from core.db import get_sessionmaker
from core.models import Study
from core.settings import Settings, get_settings

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def app_settings(app: Any) -> Settings:
    """Returns the settings an app was created with, else the process-wide ones (read on first use)."""
    settings = app.state.settings
    if settings is None:
        settings = app.state.settings = get_settings()
    return settings


def get_app_settings(request: Request) -> Settings:
    """Returns the settings of the app serving this request."""
    return app_settings(request.app)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """Yields a session for this request; routes that write commit explicitly."""
    with get_sessionmaker(settings.database_url)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_study_or_404(study_id: int, session: SessionDep) -> Study:
    """Returns the study named in the path, or answers 404."""
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(status_code=404, detail=f"study {study_id} not found")
    return study


StudyDep = Annotated[Study, Depends(get_study_or_404)]


@lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def _address(text: str) -> IPAddress | None:
    """Parses one hop of X-Forwarded-For ("203.0.113.7", "[2001:db8::1]", "203.0.113.7:4711"), else None."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def forwarded_client(peer: str, forwarded_for: list[str], *, trusted_proxies: list[str]) -> str:
    """Returns the client address given the TCP peer and the X-Forwarded-For header values.

    The header is believed only when the peer is a trusted proxy, and then only from the right: each trusted
    proxy appends the address it saw, so the right-most hop that is not a trusted proxy is the client.
    Anything left of it was written by the client itself and may be forged.
    """
    networks = _networks(tuple(trusted_proxies))

    def trusted(ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in networks)

    if not trusted(_address(peer)):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        ip = _address(hop)
        if ip is None:  # a malformed hop: nothing left of it can be believed, keep the last known address
            break
        client = str(ip)
        if not trusted(ip):
            break
    return client


def client_host(request: Request) -> str:
    """Returns the client address for the audit trail and sign-in throttling; every route asks here.

    The TCP peer, or behind a trusted proxy (settings.trusted_proxies) the address it forwarded.
    """
    if not request.client or not request.client.host:
        return "unknown"
    return forwarded_client(request.client.host, request.headers.getlist("x-forwarded-for"),
                            trusted_proxies=app_settings(request.app).trusted_proxies)
