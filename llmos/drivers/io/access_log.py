"""The io driver's access log: one line per HTTP request aiohttp answered, on the logger
"llmos.access" (JSON fields: method, path, status, bytes, duration_s, request_id, principal).

The principal is what the io driver can see (the Unix peer's uid, or a key's fingerprint):
the kernel decides who that is and logs the tenant and model on its own line for the request,
under the same request id. The query string is left out: it may carry a secret.
Connections refused at the cap (limits.py) never reach aiohttp and are not logged here.
"""
from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger

from llmos.drivers.io.credentials import credentials_of

log = logging.getLogger("llmos.access")


class AccessLogger(AbstractAccessLogger):
    def log(self, request, response, time: float) -> None:
        rid = response.headers.get("X-Request-Id") or request.headers.get("X-Request-Id")
        extra = {"method": request.method, "path": request.path[:512], "status": response.status,
                 "bytes": response.body_length, "duration_s": round(time, 4), "request_id": rid,
                 "principal": _principal(request)}
        self.logger.info("%s %s %s", request.method, request.path[:512], response.status, extra=extra)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _principal(request) -> str | None:
    """'uid:1000' on the socket, 'key:<first 12 hex of its SHA-256>' with a key, else None."""
    try:
        creds = credentials_of(request)
    except Exception:   # a malformed Authorization header: it was answered 401 already
        return None
    if creds.key_sha256:
        return f"key:{creds.key_sha256[:12]}"
    return f"uid:{creds.uid}" if creds.uid is not None else None
