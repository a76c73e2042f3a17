"""The optional API key. OpenAI clients send `Authorization: Bearer KEY`; A1111 clients send HTTP Basic
(`--api-auth user:password` there): the key is accepted as the Basic password with any user name, or as the
whole `user:password`. Compared in constant time. The page, /healthz and the static files need no key; a 401
carries `WWW-Authenticate: Basic`, so a browser asks for it once and then sends it with every API call."""
from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import Request

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
