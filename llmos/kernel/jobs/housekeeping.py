"""The job store's upkeep, run a bounded step at a time from the JobManager's loop:

    sweep (every SWEEP_S): batches past their completion window expire; files past their
          expires_at, and (retention) finished jobs and files older than N days, are deleted
    erase: rows left by deletions go, ERASE_ROWS (or 16 MiB of values) per step; then the
          WAL is checkpointed and truncated (erasure.py); then free pages are returned to
          the file system, VACUUM_PAGES per step
    reseal: a rotation's next RESEAL_ROWS rows (rotation.py)

and the deletion commands: jobs.delete (an ended job, and its input file if no other job
reads it) and jobs.purge (ended jobs older than some age).
"""
from __future__ import annotations

import logging
import time

from llmos.kernel.jobs.refusals import Refused
from llmos.kernel.jobs.rotation import Resealer
from llmos.kernel.jobs.states import TERMINAL
from llmos.kernel.jobs.store import JobStore

log = logging.getLogger(__name__)
SWEEP_S = 60.0
ERASE_ROWS = 2000
VACUUM_PAGES = 256
PURGE_BATCH = 1000      # jobs (or files) deleted by one jobs.purge or sweep (more: at the next)
MAX_AGE_S = 100 * 365 * 86400.0


class Housekeeper:
    """`expire(job_id)`: the manager ends a running job as expired; `forget(job_id)`: it drops
    what it holds in memory of a deleted job. `clock`: wall time (tests move it)."""

    def __init__(self, store: JobStore, expire, forget, retention_days: float | None = None, clock=time.time):
        self.store, self.expire, self.forget, self.clock = store, expire, forget, clock
        self.retention_s = retention_days * 86400.0 if retention_days else None
        self.resealer = Resealer(store)
        self.next_sweep = 0.0                 # monotonic; 0: at the first tick
        self.dirty = self.vacuuming = False   # erased since the last checkpoint / free pages to return
        self.erased = 0
        self.commands = {"jobs.delete": self.delete, "jobs.purge": self.purge, "storage.rotate": self.rotate}
        self.queries = {"storage.status": self.status}

    def tick(self) -> bool:
        """One step of each kind of upkeep that is due; True while more work is waiting."""
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + SWEEP_S
            if self.sweep():
                self.next_sweep = 0.0
        busy = self.next_sweep == 0.0
        if self.store.trash_count():
            self.erased += self.store.erase_some(ERASE_ROWS)
            self.dirty = busy = True
        elif self.dirty:   # (if another process reads the store, this waits for the next round)
            if self.store.checkpoint():
                self.dirty, self.vacuuming = False, True
        elif self.vacuuming:
            self.vacuuming = self.store.vacuum_some(VACUUM_PAGES) > 0
            if not self.vacuuming:
                self.store.checkpoint()
            busy = busy or self.vacuuming
        return self.resealer.step() or busy

    def sweep(self) -> bool:
        """Expiry and retention; True if more is due than one sweep did."""
        now = self.clock()
        for job_id in self.store.expired_jobs(int(now)):
            self.expire(job_id)
        cutoff = now - self.retention_s if self.retention_s else None
        files = self.store.files_due(int(now), cutoff, PURGE_BATCH)
        for file_id in files:
            self.store.delete_file(file_id)
        jobs = self.store.jobs_ended_before(cutoff, PURGE_BATCH) if cutoff is not None else []
        for job_id in jobs:
            self._delete(job_id)
        if files or jobs:
            log.info("jobs: deleted %d expired file(s) and %d job(s) past retention", len(files), len(jobs))
        return len(files) >= PURGE_BATCH or len(jobs) >= PURGE_BATCH

    # ------------------------------------------------------------ commands
    def delete(self, args: dict) -> dict:
        """jobs.delete {id, input_file: bool}: an ended job and its results (and its input
        file, if asked and no other job reads it). A running job is refused: cancel it first."""
        job_id = args.get("id")
        job = self.store.get_job(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise Refused("batch_not_found", f"No such batch: {str(job_id)[:100]}")
        if job["status"] not in TERMINAL:
            raise Refused("batch_active", f"{job_id} is {job['status']}: cancel it first")
        return {"id": job_id, "object": "batch", "deleted": True,
                "input_file_deleted": self._delete(job_id, bool(args.get("input_file")))}

    def purge(self, args: dict) -> dict:
        """jobs.purge {older_than_s, input_files: bool}: ended jobs that ended at least that
        long ago, PURGE_BATCH at most (has_more: call again)."""
        age = args.get("older_than_s")
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age <= MAX_AGE_S:
            raise ValueError(f"older_than_s must be a number of seconds in 0..{MAX_AGE_S:g}")
        ids = self.store.jobs_ended_before(self.clock() - age, PURGE_BATCH + 1)
        files = [self._delete(j, bool(args.get("input_files", True))) for j in ids[:PURGE_BATCH]]
        return {"deleted": len(files), "ids": ids[:100], "input_files_deleted": sum(files),
                "has_more": len(ids) > PURGE_BATCH}

    def _delete(self, job_id: str, with_input: bool = False) -> bool:
        """Delete the job; with_input: its input file too, unless another job reads it."""
        job = self.store.get_job(job_id)
        self.store.delete_job(job_id)
        self.forget(job_id)
        fid = job and job["input_file_id"]
        if with_input and fid and not self.store.file_users(fid) and self.store.delete_file(fid):
            return True
        return False

    def rotate(self, args: dict) -> dict:
        """storage.rotate (rotation.py); answers storage.status."""
        self.resealer.rotate(args)
        return self.status()

    def status(self, args: dict | None = None) -> dict:
        """storage.status: the keys and rotation (rotation.py), and erasure still to do."""
        return {**self.resealer.status(), "erasing": self.store.trash_count(),
                "checkpoint_pending": self.dirty, "erased_rows": self.erased,
                "retention_days": self.retention_s / 86400.0 if self.retention_s else None}
