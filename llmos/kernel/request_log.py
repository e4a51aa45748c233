"""The kernel's log line for each request that ends or is refused (JSON fields via `extra`,
llmos/logging_setup.py). Ids, tenant, model, counts and times only: never prompt or output text.

Who calls: Kernel._request_done and Kernel._rejected (core.py), at the front door's events.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("llmos.kernel.requests")


def fields(req) -> dict:
    """The context every line about `req` (a kernel Request) carries."""
    out = {"request_id": req.client_id, "tenant": req.tenant, "model": req.model, "principal": req.owner}
    client_request_id = getattr(req, "client_request_id", None)   # the client's X-Request-Id, if it gave one
    if client_request_id:
        out["client_request_id"] = client_request_id
    if req.group:
        out["choice"] = req.index
    return out


def done(req, status: int | None) -> None:
    """`status`: what its client was answered; None: the client went away (logged as 499)."""
    status = 499 if status is None else status
    now = time.monotonic()
    first = req.output.first_token_at
    extra = {**fields(req), "status": status, "finish_reason": req.output.finish_reason,
             "prompt_tokens": len(req.prompt_ids), "output_tokens": len(req.output.ids),
             "priority": req.priority.name, "preemptions": req.sched.preemptions,
             "duration_s": round(now - req.sched.arrival, 4),
             "ttft_s": round(first - req.sched.arrival, 4) if first is not None else None}
    log.log(logging.WARNING if status >= 500 else logging.INFO, "request %s ended: %s, %s", req.client_id, status,
            req.output.finish_reason or "no finish", extra=extra)


def rejected(m, principal, status: int, code: str) -> None:
    """A Submit refused at the front door (quota, queue, memory, permission, bad parameter)."""
    extra = {"request_id": m.request_id, "tenant": m.tenant[:64], "model": m.model[:256],
             "principal": getattr(principal, "name", None), "status": status, "code": code}
    if getattr(m, "client_request_id", None):
        extra["client_request_id"] = m.client_request_id[:128]
    log.info("request %s refused: %s %s", m.request_id, status, code, extra=extra)
