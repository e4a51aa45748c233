"""How a job looks through the API: OpenAI's Batch object plus an "llmos" map with counts
by state, throughput and ETA. Pure functions over a store row."""
from __future__ import annotations

import time
from collections import deque

from llmos.kernel.jobs.files import ERROR_PREFIX, OUTPUT_PREFIX
from llmos.kernel.jobs.states import ENDED_EARLY, TERMINAL

RATE_WINDOW_S = 30.0


def job_view(job: dict, running: int, recent: deque | None) -> dict:
    """`job`: the store's row; `running`: its requests in flight now; `recent`: (monotonic
    time, completion tokens) of its latest results, trimmed here to the rate window."""
    jid, status = job["id"], job["status"]
    total, done, failed = job["total"], job["completed"], job["failed"]
    unfinished = total - done - failed if status in ENDED_EARLY else 0   # never to run
    left = total - done - failed - unfinished
    terminal = status in TERMINAL
    rps, tps = rates(job, recent)
    p, c = job["prompt_tokens"], job["completion_tokens"]
    return {
        "id": jid, "object": "batch", "endpoint": job["endpoint"], "errors": job["errors"],
        "input_file_id": job["input_file_id"], "completion_window": job["completion_window"], "status": status,
        "output_file_id": OUTPUT_PREFIX + jid if terminal and done else None,
        "error_file_id": ERROR_PREFIX + jid if terminal and (failed or unfinished) else None,
        **{k: job[k] for k in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                               "cancelling_at", "cancelled_at")},
        "expires_at": job["expires_at"], "expired_at": job["expired_at"], "metadata": job["metadata"],
        "request_counts": {"total": total, "completed": done, "failed": failed},
        "usage": {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": c,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c},
        "llmos": {"counts": {"total": total, "pending": left - running, "running": running, "completed": done,
                             "failed": failed, "cancelled": unfinished if status != "expired" else 0,
                             "expired": unfinished if status == "expired" else 0},
                  "throughput": {"requests_per_s": rps, "tokens_per_s": tps},
                  "eta_s": 0.0 if not left else round(left / rps, 1) if rps and not terminal else None,
                  "output_file_id": OUTPUT_PREFIX + jid, "error_file_id": ERROR_PREFIX + jid},
    }


def rates(job: dict, recent: deque | None) -> tuple[float, float]:
    """Requests and completion tokens per second: over the last RATE_WINDOW_S while the
    job runs, over its whole life once it has ended."""
    end = job["completed_at"] or job["cancelled_at"] or job["failed_at"] or job["expired_at"]
    if end is not None:
        span = max(end - (job["in_progress_at"] or job["created_at"]), 1)
        return round((job["completed"] + job["failed"]) / span, 2), round(job["completion_tokens"] / span, 1)
    now = time.monotonic()
    while recent and now - recent[0][0] > RATE_WINDOW_S:
        recent.popleft()
    if not recent:
        return 0.0, 0.0
    span = max(now - recent[0][0], 1.0)
    return round(len(recent) / span, 2), round(sum(t for _, t in recent) / span, 1)
