"""How the kernel answers queries and commands from the io driver (and in-kernel clients):
who may ask (access.py), then each `what` to its answer. Every query and command gets a
reply, whatever its handler raises. A mixin of Kernel (core.py), which owns the state it
reads: the request table, the engines, the supervisor, the job store."""
from __future__ import annotations

import logging
import os
import time

from llmos import protocol
from llmos.kernel.auth import AuthError
from llmos.kernel.metrics import gateway_view
from llmos.kernel.tokenize_queries import TokenizeQueries

log = logging.getLogger("llmos.kernel.core")   # (the kernel's lines, as before the split)


def key_change(args: dict) -> dict:
    """Only for the audit record (Auditor.command); the keys themselves live in keys.db."""
    if args.get("action") not in ("create", "revoke") or not isinstance(args.get("id"), str) or len(args["id"]) > 64:
        raise ValueError("keys.changed needs action (create or revoke) and the key's id")
    return {"recorded": True}


class KernelAnswers:
    def _answer(self, peer: str, m) -> None:
        """Every query and command gets a reply, whatever its handler raises: a client
        waits for it, and silence would only become a timeout."""
        try:
            principal = self.access.check(m)
        except AuthError as exc:
            self.auditor.auth_failure(m.what, m.auth, str(exc))
            return self.send(peer, protocol.QueryReply(query_id=m.query_id, error=str(exc), status=exc.status))
        try:
            if m.what == "cancel":   # a principal finds only its own requests
                answer = self._command(m.what, m.args, {"cancel": lambda a: self.front.cancel(a["id"], principal)})
            elif m.what == "ps":
                answer = {"ps": self._ps(principal)}
            elif m.what == "metrics":   # the admin's figures name tenants; the gateway's gauges do not
                snap = self.metrics.snapshot()
                answer = {"metrics": snap if principal.admin else gateway_view(snap)}
            elif m.what in TokenizeQueries.QUERIES and isinstance(m, protocol.Query):
                return self.tokenize.ask(peer, m, principal)   # answered when the tokenizer replies
            elif m.what in self.jobs.commands or m.what in self.jobs.queries:   # one's own files and batches
                table = self.jobs.commands if m.what in self.jobs.commands else self.jobs.queries
                answer = self._command(m.what, m.args, {m.what: self.job_owners.scoped(m.what, table[m.what],
                                                                                        principal)})
            elif isinstance(m, protocol.Query):
                answer = self._query(m.what, m.args)
            else:
                answer = self._command(m.what, m.args)
            reply = protocol.QueryReply(query_id=m.query_id, **answer)
            if isinstance(m, protocol.Command):
                self.auditor.command(m.what, m.args, principal, answer.get("error"))
        except Exception as exc:
            log.exception("%s %r failed", type(m).__name__, m.what)
            reply = protocol.QueryReply(query_id=m.query_id, error=f"{m.what}: internal error: {type(exc).__name__}: {exc}")
        try:
            self.send(peer, reply)
        except protocol.Unencodable as exc:
            self.send(peer, protocol.QueryReply(query_id=m.query_id, error=f"{m.what}: the answer cannot be encoded: {exc}"))

    # ------------------------------------------------------------ queries (read only)
    def _query(self, what: str, args: dict) -> dict:
        """The QueryReply fields answering `what`: its record, `data` or `error`."""
        if what == "health":
            return {"health": self.health()}
        if what == "models":
            created = int(time.time() - (time.monotonic() - self.started))
            return {"models": [self.model_commands.entry(name, created) for name in self.host.names()]}

        if what == "memory":
            return {"memory": self.memory()}
        if what == "metrics":
            return {"metrics": self.metrics.snapshot()}
        if what == "alerts":
            return {"alerts": self.alerts.report()}
        if what in self.queries:
            return self._command(what, args, self.queries)
        return {"error": f"unknown query {what!r}"}

    def _ps(self, principal) -> protocol.ProcessReport:
        mine = (lambda owner: True) if principal.admin else (lambda owner: owner == principal.name)
        return protocol.ProcessReport(
            processes=self.supervisor.processes() if principal.admin else [],
            requests=self.front.parking.summaries(mine) + [r.summary() for r in self.front.table.values()
                                                           if mine(r.owner)],
            scheduler={n: e.policy_snapshot() for n, e in self.engines.items() if e.loaded} if principal.admin else {})

    def _command(self, what: str, args: dict, table: dict | None = None) -> dict:
        handler = (self.commands if table is None else table).get(what)
        if handler is None:
            return {"error": f"unknown command {what!r}"}
        try:
            return {"data": handler(args)}
        except (KeyError, ValueError, TypeError) as exc:
            return {"error": f"{what}: {exc}"}

    def _restart_driver(self, args: dict) -> dict:
        name = args.get("name")
        if name not in self.supervisor.table:
            raise ValueError(f"no driver named {name!r}; drivers: {', '.join(self.supervisor.order)}")
        self.supervisor.restart(name)
        return {"restarting": name}

    def health(self) -> protocol.HealthReport:
        # Ready once every --model loaded once; after that models may come and go (evicted, reloaded).
        serving = [self.engines[e] for d in self.host.deployments.values() for e in d.serving if e in self.engines]
        ready = self.host.specs.keys() <= self.host.ever_loaded and all(
            e.driver_ready and self.supervisor.is_running(e.tokenizer)
            for e in serving if self.host.state(e.model) == "loaded")
        io_up = self.supervisor.is_running("io")
        status = "draining" if self.front.draining else ("ok" if ready and io_up else "starting")
        failed = [d.spec.name for d in self.supervisor.table.values() if d.state.value == "failed"]
        if failed or self.dead_loops or (self.auditor.audit is not None and self.auditor.audit.failed):
            status = "degraded"
        return protocol.HealthReport(
            status=status, pid=os.getpid(), uptime_s=round(time.monotonic() - self.started, 1),
            device=self.device.device, failed_drivers=failed, dead_loops=dict(self.dead_loops),
            step_crashes=sum(e.step_crashes for e in self.engines.values()),
            bad_step_results=sum(e.bad_results_total for e in self.engines.values()),
            models={n: ("ready" if e.driver_ready else "loading") for n, e in self.engines.items()},
            requests_in_flight=len(self.front.table), rejected_bus_messages=self.bus.rejected)

    def memory(self) -> dict[str, protocol.MemoryReport | None]:
        """Per model its memory report; None while it loads."""
        return {name: e.memory_report() if e.loaded else None for name, e in self.engines.items()}
