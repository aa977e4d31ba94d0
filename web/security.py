"""Response headers every answer carries, and the request body size limit (pure ASGI middleware)."""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("chestaid.web")

# Everything is served from this origin: no inline scripts or styles, no third-party hosts, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def add_security_headers(headers: MutableHeaders) -> None:
    """Sets the security headers a response does not set itself; pages are never cached (patient data)."""
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    if headers.get("content-type", "").startswith("text/html"):
        headers.setdefault("Cache-Control", "no-store")


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response, static files and refusals included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413: by Content-Length up front, else while reading.

    The body (at most the limit) is read before the app runs and replayed to it, so a chunked upload
    without a length cannot slip past, and no handler ever sees a partial body.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[Any], int]):
        self.app = app
        self.limit_for = limit_for

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["app"])
        too_large = f"request body too large (the limit is {limit} bytes)"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "invalid Content-Length")
                return
            if int(declared) > limit:
                await self._refuse(scope, receive, send, 413, too_large)
                return
        chunks: list[bytes] = []
        total, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await self._refuse(scope, receive, send, 413, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class InternalErrorMiddleware:
    """Answers an unhandled exception with a generic 500 (no traceback to the client) and logs it safely.

    The log gets the exception type and the stack (files, lines, functions) but not the exception's
    message: database errors quote SQL parameters, which may be patient identifiers. The exception is not
    re-raised, so the server does not log it again with its message.
    """

    def __init__(self, app: ASGIApp, respond: Callable[[Scope], Response]):
        self.app = app
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            log.error("unhandled %s on %s %s\n%s", type(exc).__name__, scope.get("method"), scope.get("path"),
                      "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            if not started:
                await self.respond(scope)(scope, receive, send)
