"""What guards the routes: the optional API key, and the cap on request bodies.

The API key. OpenAI clients send `Authorization: Bearer KEY`; A1111 clients send HTTP Basic
(`--api-auth user:password` there): the key is accepted as the Basic password with any user name, or as the
whole `user:password`. Compared in constant time. The page, /healthz and the static files need no key; a 401
carries `WWW-Authenticate: Basic`, so a browser asks for it once and then sends it with every API call.

The body cap: a request whose body is larger than `max_bytes` (by its Content-Length, or counted as it arrives
when chunked) fails when a route reads it, with an HTTPException(413) that the app answers as JSON like every
other error. Starlette's own RequestBodyLimitMiddleware answers such requests in plain text, hence this one."""
from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Unauthorized


def authorized(header: str, key: str) -> bool:
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.encode(), key.encode())
    if scheme.lower() == "basic":
        try:
            pair = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        password = pair.partition(":")[2]
        return hmac.compare_digest(password.encode(), key.encode()) or hmac.compare_digest(pair.encode(), key.encode())
    return False


def require_key(key: str | None):
    """A FastAPI dependency that refuses requests without `key` (none when key is None)."""
    async def check(request: Request) -> None:
        if key is not None and not authorized(request.headers.get("authorization", ""), key):
            raise Unauthorized("this server needs an API key: send `Authorization: Bearer KEY` (OpenAI clients) "
                               "or HTTP Basic with the key as password (A1111 clients)")
    return check


class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` raise HTTPException(413) when read (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise HTTPException(413, "request body too large")
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, limited, send)
