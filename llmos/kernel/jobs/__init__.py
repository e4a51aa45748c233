"""Durable batch jobs (OpenAI Batch API): the kernel owns them (design.md rule 1).

store.py: the SQLite (WAL) store; batchfile.py: the line format in and out; files.py:
uploads and file pages; manager.py: JobManager, which feeds jobs to the front door;
views.py: a job as the API shows it.
"""
from llmos.kernel.jobs.manager import JobManager
from llmos.kernel.jobs.store import JobStore

__all__ = ["JobManager", "JobStore"]
