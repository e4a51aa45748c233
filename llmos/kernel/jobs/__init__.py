"""Durable batch jobs (OpenAI Batch API): the kernel owns them (design.md rule 1).

store.py: the SQLite (WAL) store (filetable.py: its files; erasure.py: deletion that
erases); sealing.py: encryption at rest and the storage keys; rotation.py: re-sealing with
a new key while serving; batchfile.py: the line format in and out; files.py: uploads and
file pages; intake.py: what jobs.create accepts; manager.py: JobManager, which feeds jobs
to the front door; housekeeping.py: expiry, retention, erasure and re-sealing steps;
views.py: a job as the API shows it; states.py and refusals.py: job states, coded refusals.
"""
from llmos.kernel.jobs.manager import JobManager
from llmos.kernel.jobs.store import JobStore

__all__ = ["JobManager", "JobStore"]
