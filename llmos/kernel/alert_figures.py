"""The figures alert rules read, taken from their owners in the kernel.

  - every /metrics family, from the kernel's own MetricsSnapshot (kernel/metrics.py): one
    snapshot per round, the same figures a scrape gets;
  - llmos_model_failed{model}: 1 for a model whose last load failed (the model host's
    residency table), 0 for the others it knows;
  - llmos_batch_job_stalled_seconds{job}: for each in-progress batch job, the seconds since
    a line of it last got a result (or since this kernel first saw it), read from the job
    store at most every JOB_POLL_S, for at most MAX_JOBS jobs.
"""
from __future__ import annotations

import time
from typing import Callable

from llmos.kernel.alert_window import Figure

JOB_POLL_S = 5.0
MAX_JOBS = 100


class KernelFigures:
    def __init__(self, metrics, host, jobs: Callable, clock=time.monotonic):
        """`metrics`: the kernel's Metrics; `host`: its ModelHost; `jobs`: -> the JobManager
        or None (it exists once the kernel runs)."""
        self.metrics, self.host, self._jobs, self.clock = metrics, host, jobs, clock
        self._progress: dict[str, tuple[int, float]] = {}   # job id -> (lines with a result, when that changed)
        self._polled = float("-inf")

    def read(self) -> dict[str, Figure]:
        now = self.clock()
        figures = {}
        for fam in self.metrics.snapshot().families:
            series = {tuple(s.labels): (list(s.buckets) if fam.kind == "histogram" else s.value) for s in fam.series}
            figures[fam.name] = Figure(fam.kind, tuple(fam.label_names), series, fam.bounds)
        figures["llmos_model_failed"] = Figure("gauge", ("model",), {
            (name,): 1.0 if r.state.value == "failed" else 0.0 for name, r in self.host.table.models.items()})
        figures["llmos_batch_job_stalled_seconds"] = Figure("gauge", ("job",), self._stalled(now))
        return figures

    def _stalled(self, now: float) -> dict:
        jobs = self._jobs()
        if jobs is None:
            return {}
        if now - self._polled >= JOB_POLL_S:
            self._polled = now
            seen = {}
            for job_id in list(jobs.active)[:MAX_JOBS]:
                job = jobs.store.get_job(job_id)
                if job is None or job["status"] != "in_progress":
                    continue
                done = job["completed"] + job["failed"]
                held = self._progress.get(job_id)
                seen[job_id] = held if held is not None and held[0] == done else (done, now)
            self._progress = seen
        return {(job_id,): now - since for job_id, (_, since) in self._progress.items()}
