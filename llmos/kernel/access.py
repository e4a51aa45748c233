"""Which queries and commands a principal may send (kernel/auth.py says who it is).

Open to every authenticated principal: health, the model list, its own requests (ps shows
only those, cancel finds only those), the jobs and files API (jobs/ scopes them) and metrics,
of which a principal who is not the admin gets only the aggregate gauges an inference gateway
routes by (metrics.gateway_view: no tenant, no request is named in them). The
rest (restart, memory, models' registry, load/unload/scale/upgrade, keys) is the admin's.
Health is open even without credentials: a load balancer probes it.
"""
from __future__ import annotations

from llmos import protocol
from llmos.kernel.auth import AuthError, Authority, Principal

ANONYMOUS = {"health"}
OPEN = {"health", "models", "ps", "cancel", "metrics"}   # metrics: a non-admin gets the gateway's gauges only


class Access:
    def __init__(self, authority: Authority, open_too: set[str] = frozenset()):
        self.authority = authority
        self.open = OPEN | set(open_too)

    def check(self, m) -> Principal | None:
        """The principal of a Query or Command, or AuthError (401 or 403). None: anonymous health."""
        if m.what in ANONYMOUS:   # whatever credentials came with it
            return None
        principal = self.authority.principal(m.auth)
        if m.what not in self.open and not principal.admin:
            raise AuthError(403, f"'{m.what}' needs an admin key (this is {principal.name})")
        return principal

    def submit(self, m: protocol.Submit) -> Principal:
        return self.authority.principal(m.auth)
