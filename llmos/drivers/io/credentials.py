"""Who is on the other end of an HTTP request, as the io driver can see it.

The io driver decides nothing: it reads the Unix socket peer's uid and gid (SO_PEERCRED) and
the Authorization header, hashes the key, and every message it sends for this request carries
that (KernelLink reads CURRENT); the kernel authenticates and authorizes (kernel/auth.py).

On the Unix socket, a bearer token that is not an llmos key (SDKs insist on sending one, say
"local") is ignored and the peer's uid speaks; over TCP every token must be a valid key.
"""
from __future__ import annotations

import hashlib
import socket
import struct
from contextvars import ContextVar

from aiohttp import web

from llmos import protocol
from llmos.openai_format import ApiError

KEY_PREFIX = "llmos-"          # kernel/auth.py makes keys with it
MAX_KEY_CHARS = 256
CURRENT: ContextVar[protocol.Credentials | None] = ContextVar("llmos_credentials", default=None)


def credentials_of(request: web.Request) -> protocol.Credentials:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    unix = sock is not None and sock.family == socket.AF_UNIX
    uid = gid = None
    if unix:
        _pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    key = None
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_CHARS:
            raise ApiError(401, "the Authorization header must be 'Bearer <key>'", code="invalid_api_key")
        if token.startswith(KEY_PREFIX) or not unix:
            key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    return protocol.Credentials(transport="unix" if unix else "tcp", uid=uid, gid=gid, key_sha256=key)


@web.middleware
async def attach_credentials(request: web.Request, handler):
    """Every kernel message sent while handling this request carries its credentials."""
    token = CURRENT.set(credentials_of(request))
    try:
        return await handler(request)
    finally:
        CURRENT.reset(token)
