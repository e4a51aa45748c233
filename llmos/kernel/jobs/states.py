"""Job states (OpenAI's batch statuses) and the transitions allowed between them."""
from __future__ import annotations

ALLOWED = {
    "validating": {"in_progress", "failed"},
    "in_progress": {"finalizing", "cancelling", "failed", "expired"},
    "finalizing": {"completed", "failed"},
    "cancelling": {"cancelled"},
    "completed": set(), "failed": set(), "cancelled": set(), "expired": set(),
}
ACTIVE = ("in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "cancelled", "expired")
ENDED_EARLY = ("cancelled", "failed", "expired")            # lines may never have run
ENDED_AT = "COALESCE(completed_at, failed_at, cancelled_at, expired_at)"   # SQL: when a job ended
