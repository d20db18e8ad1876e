"""The web demo's guards, as a plain ASGI middleware: the request body's framing and limit (enforced while it
streams in), and Host / Origin checks so that only the demo's own page (not another site or another local
application in the same browser, nor a DNS-rebound name) can post photos.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LOOPBACK_HOSTS", "RequestGuard", "is_loopback"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
BODY_METHODS = ("POST", "PUT", "PATCH")
DEFAULT_PORTS = {"http": 80, "https": 443}
Origin = tuple[str, str, int | None]  # scheme, host name, port


def is_loopback(host: str) -> bool:
    """Whether a listening address or Host name stays on this machine."""
    return host.strip("[]") in LOOPBACK_HOSTS or host.startswith("127.")


class _TooLarge(Exception):
    pass


def _hostname(value: str) -> str:
    """``example.org`` from ``example.org:8000`` / ``[::1]:8000`` (lower case)."""
    return (urlsplit(f"//{value}").hostname or "").lower()


def _origin(scheme: str, netloc: str) -> Origin | None:
    """(scheme, host name, port) of ``scheme://netloc``, the port made explicit; None when malformed."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        return scheme.lower(), (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme.lower())
    except ValueError:  # a port that is not a number, or out of range
        return None


def _declared_origin(value: str) -> Origin | None:
    """The Origin header as (scheme, host name, port); None for ``null`` or anything malformed."""
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    if not parts.scheme or not parts.netloc or parts.path not in ("", "/"):
        return None
    return _origin(parts.scheme, parts.netloc)


def _framing_error(headers: dict[str, str], has_body: bool) -> tuple[int, str] | None:
    """(status, detail) for a malformed Content-Length, or for a request with a body (``has_body``: its method
    has one) framed by neither a Content-Length nor chunked transfer encoding; else None."""
    length = headers.get("content-length")
    if length is not None and not re.fullmatch(r"[0-9]{1,18}", length.strip()):
        return 400, f"malformed Content-Length header: {length[:40]!r}"
    if has_body and length is None and "chunked" not in headers.get("transfer-encoding", "").lower():
        return 411, "the request needs a Content-Length header (or chunked transfer encoding)"
    return None


class RequestGuard:
    """Refuse requests with a foreign Host (421), cross-origin POSTs (403: an Origin whose scheme, host or port
    differs from the page's), bodies with a malformed Content-Length (400) or no framing at all (411), and bodies
    over ``max_body_bytes`` (413, counted as the body arrives, also when chunked), with a JSON ``detail`` message.

    Args:
        app: the application to guard.
        max_body_bytes: the largest request body accepted.
        allowed_hosts: Host names served (besides the loopback names); ``"*"`` allows any.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed = {h.strip("[]").lower() for h in (*LOOPBACK_HOSTS, *allowed_hosts)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _hostname(headers.get("host", ""))
        if "*" not in self.allowed and host not in self.allowed:
            await _reply(send, 421, f"this demo serves {', '.join(sorted(self.allowed))}, not the host {host!r}")
            return
        origin = headers.get("origin")
        served = _origin(scope.get("scheme", "http"), headers.get("host", ""))
        if scope["method"] not in ("GET", "HEAD") and origin is not None and (
                served is None or _declared_origin(origin) != served):
            await _reply(send, 403, f"cross-origin request from {origin[:100]} refused: use the demo's own page")
            return
        if (error := _framing_error(headers, scope["method"] in BODY_METHODS)) is not None:
            await _reply(send, *error)
            return
        if int(headers.get("content-length", "0").strip() or 0) > self.max_body_bytes:
            await _reply(send, 413, f"the upload is larger than {self.max_body_bytes // 2**20} MiB")
            return
        received, too_large, replied = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                too_large = True
                raise _TooLarge  # stops reading; whatever the app answers then is replaced by the 413 below
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replied
            if not too_large:
                await send(message)
            elif not replied:
                replied = True
                await _reply(send, 413, f"the upload is larger than {self.max_body_bytes // 2**20} MiB")

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:  # the body's end was cut off: the app may fail on it in its own way
            if not too_large:
                raise
        if too_large and not replied:
            await _reply(send, 413, f"the upload is larger than {self.max_body_bytes // 2**20} MiB")


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
