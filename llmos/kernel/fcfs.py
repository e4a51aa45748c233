"""The simplest scheduling policy, for comparison with policy.PriorityPolicy: the same
interface, arrival order, no classes and no tenants."""
from __future__ import annotations

from llmos.kernel.policy import Priority


class FCFSPolicy:
    """First come, first served: admit in arrival order, preempt the newest, no tenants."""

    name = "fcfs"

    def parse(self, value, tenant: str) -> Priority:
        return Priority(1, 0)

    def check_admission(self, tenant, now):
        return None

    def order(self, waiting, now):
        return sorted(waiting, key=lambda r: r.sched.arrival)

    def pick_victim(self, running, now):
        return max(running, key=lambda r: r.sched.arrival)

    def preemption_candidates(self, head, running, now):
        return []

    def fairness_candidates(self, head, running, now):
        return []

    def on_queued(self, req): ...
    def on_started(self, req, now): ...
    def on_preempted(self, req, cause): ...
    def on_finished(self, req, running): ...
    def charge(self, req, tokens, now): ...
    def check_integrity(self, waiting, running): ...

    def snapshot(self, now):
        return {"policy": self.name}
