"""What the kernel writes to the audit log (llmos/audit/), and when. A broken log never
fails a request: its errors are logged, and /health says degraded (AuditLog.failed).

    auth.failure   a refused credential: principal claimed, route, reason
    admin          a command from the admin API: action, target, status
    key.change     API keys and storage keys (the CLI records its own key edits too)
    model.*        load, unload, upgrade, rollback, with status
    job.*          submit, cancel, delete
    request        one per client request: principal, model, tenant, tokens, status, duration
"""
from __future__ import annotations

import logging
import time

from llmos.audit import AuditError, AuditLog

log = logging.getLogger(__name__)
COMMAND_KINDS = {"load": "model.load", "unload": "model.unload", "upgrade": "model.upgrade",
                 "rollback": "model.rollback", "jobs.create": "job.submit", "jobs.cancel": "job.cancel",
                 "files.delete": "job.delete", "jobs.delete": "job.delete", "jobs.purge": "job.delete",
                 "storage.rotate": "key.change", "keys.changed": "key.change"}
QUIET = {"files.begin", "files.append", "files.commit", "files.discard"}   # an upload: its commit is jobs'


class Auditor:
    def __init__(self, audit: AuditLog | None):
        self.audit = audit
        self._groups: dict[str, int] = {}   # n > 1: tokens of the choices done so far

    def _record(self, kind: str, **fields) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(kind, **{k: v for k, v in fields.items() if v is not None})
        except (AuditError, ValueError, OSError) as exc:
            log.error("audit: could not record %s: %s", kind, exc)

    def event(self, kind: str, **fields) -> None:
        """Something the kernel did by itself (a model loaded on demand, unloaded when idle,
        evicted, an upgrade switched or rolled back)."""
        self._record(kind, principal="kernel", **fields)

    def auth_failure(self, route: str, creds, reason: str) -> None:
        self._record("auth.failure", route=route, transport=getattr(creds, "transport", None),
                     uid=getattr(creds, "uid", None), key=(creds.key_sha256[:12] if creds and creds.key_sha256 else None),
                     reason=reason)

    def command(self, what: str, args: dict, principal, error: str | None) -> None:
        if what in QUIET:
            return
        target = {k: v for k, v in args.items() if k in ("name", "id", "version", "replicas", "to", "file_id",
                                                          "job_id", "model", "action", "tenant")
                  and isinstance(v, (str, int))}
        fields = {"action": what, **target}   # (keys.changed names its own action)
        self._record(COMMAND_KINDS.get(what, "admin"), principal=principal.name if principal else None,
                     status="ok" if error is None else "refused", error=error, **fields)

    def rejected(self, m, principal, status: int, code: str) -> None:
        self._record("request", request_id=m.request_id, principal=principal.name, model=m.model[:256],
                     tenant=m.tenant[:64], prompt_tokens=0, completion_tokens=0, status=status, error=code,
                     duration_s=0.0)

    def request(self, req, status: int | None) -> None:
        """`req` left the table; for n > 1 the record comes with its group's last choice."""
        tokens = self._groups.pop(req.group, 0) + len(req.output.ids) if req.group else len(req.output.ids)
        if self.audit is None:
            return
        try:
            self.audit.request(request_id=req.client_id, principal=req.owner, model=req.model, tenant=req.tenant,
                               prompt_tokens=len(req.prompt_ids), completion_tokens=tokens,
                               status=499 if status is None else status, finish_reason=req.output.finish_reason,
                               duration_s=time.monotonic() - req.sched.arrival, prompt=req.messages or req.prompt)
        except (AuditError, ValueError, OSError) as exc:
            log.error("audit: could not record request %s: %s", req.client_id, exc)

    def choice_done(self, req) -> None:
        """A choice of an n > 1 request finished before its group did."""
        self._groups[req.group] = self._groups.get(req.group, 0) + len(req.output.ids)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
