"""The job store: one SQLite database in write-ahead-log mode ($LLMOS_HOME/jobs.db).

The kernel's JobManager is its only writer (design.md rule 1); every method is one
transaction, called from the kernel's event loop (each is short: a page of lines, one
step's results).

Durability: a finished upload and a new job are committed with synchronous=FULL (fsynced
before their ids are answered). Request states and results are committed with
synchronous=NORMAL: in WAL mode a committed transaction is in the OS when commit returns,
so it survives kill -9 of the daemon; a power cut may lose the last few results, which are
then recomputed. A result is never written twice: a line has one row (primary key
(job_id, line_no)) and a result is written only over state 'running'.

Request rows are created lazily, when a line is first started; lines at or after the
job's `next_line` have no row yet and count as pending.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0, lines INTEGER NOT NULL DEFAULT 0, endpoint TEXT,
    complete INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS file_lines (
    file_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (file_id, line_no)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS file_custom_ids ON file_lines (file_id, custom_id);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, total INTEGER NOT NULL,
    next_line INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, in_progress_at INTEGER,
    finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER,
    cancelled_at INTEGER, errors TEXT);
CREATE TABLE IF NOT EXISTS requests (
    job_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, request_id TEXT, status_code INTEGER, response TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    finished_at REAL, PRIMARY KEY (job_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_state ON requests (job_id, state, line_no);
"""

# Job states (OpenAI's batch statuses) and the transitions allowed between them.
ALLOWED = {
    "validating": {"in_progress", "failed"},
    "in_progress": {"finalizing", "cancelling", "failed"},
    "finalizing": {"completed", "failed"},
    "cancelling": {"cancelled"},
    "completed": set(), "failed": set(), "cancelled": set(),
}
ACTIVE = ("in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "cancelled")


class StoreError(RuntimeError):
    """A request to the store that breaks its rules (an illegal job transition)."""


class JobStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # private before the first byte
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {version}; this llmos knows {SCHEMA_VERSION}")
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self, durable: bool = False):
        if durable:
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous=NORMAL")

    def recover(self) -> int:
        """At kernel start: requests that were running go back to pending (they are resent);
        uploads that never finished are dropped. Returns how many requests were requeued."""
        with self._tx() as db:
            n = db.execute("UPDATE requests SET state='pending' WHERE state='running'").rowcount
            db.execute("DELETE FROM file_lines WHERE file_id IN (SELECT id FROM files WHERE complete=0)")
            db.execute("DELETE FROM files WHERE complete=0")
        return n

    # ------------------------------------------------------------ files
    def begin_file(self, file_id: str, filename: str, purpose: str, now: int) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO files (id, filename, purpose, created_at) VALUES (?, ?, ?, ?)",
                       (file_id, filename, purpose, now))

    def add_lines(self, file_id: str, rows: list[tuple[int, str, str]]) -> list[tuple[int, str]]:
        """Insert (line_no, custom_id, text) rows; returns (line_no, message) for duplicates."""
        errors = []
        with self._tx() as db:
            for line_no, custom_id, text in rows:
                try:
                    db.execute("INSERT INTO file_lines VALUES (?, ?, ?, ?)", (file_id, line_no, custom_id, text))
                except sqlite3.IntegrityError:
                    first = db.execute("SELECT line_no FROM file_lines WHERE file_id=? AND custom_id=?",
                                       (file_id, custom_id)).fetchone()
                    where = f" (first on line {first[0]})" if first else ""
                    errors.append((line_no, f"duplicate custom_id {custom_id!r}{where}"))
        return errors

    def commit_file(self, file_id: str, nbytes: int, lines: int, endpoint: str) -> None:
        with self._tx(durable=True) as db:
            db.execute("UPDATE files SET complete=1, bytes=?, lines=?, endpoint=? WHERE id=? AND complete=0",
                       (nbytes, lines, endpoint, file_id))

    def discard_file(self, file_id: str) -> None:
        """Drop an upload that did not finish (finished files are kept)."""
        with self._tx() as db:
            if db.execute("DELETE FROM files WHERE id=? AND complete=0", (file_id,)).rowcount:
                db.execute("DELETE FROM file_lines WHERE file_id=?", (file_id,))

    def get_file(self, file_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM files WHERE id=? AND complete=1", (file_id,)).fetchone()
        return dict(row) if row else None

    def file_page(self, file_id: str, after: int, limit: int) -> list[sqlite3.Row]:
        return self.db.execute("SELECT line_no, text FROM file_lines WHERE file_id=? AND line_no>? "
                               "ORDER BY line_no LIMIT ?", (file_id, after, limit)).fetchall()

    # ------------------------------------------------------------ jobs
    def create_job(self, job_id: str, file: dict, endpoint: str, window: str, metadata: dict | None,
                   now: int) -> None:
        """Accept a job over a finished input file: committed and fsynced when this returns."""
        with self._tx(durable=True) as db:
            db.execute("INSERT INTO jobs (id, status, endpoint, input_file_id, completion_window, metadata, total,"
                       " created_at, in_progress_at) VALUES (?, 'in_progress', ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, endpoint, file["id"], window, json.dumps(metadata) if metadata else None,
                        file["lines"], now, now))

    def get_job(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, limit: int = 100, after: str | None = None) -> list[dict]:
        """Newest first; `after` is a job id (the last one of the previous page)."""
        if after:
            rows = self.db.execute("SELECT * FROM jobs WHERE rowid < (SELECT rowid FROM jobs WHERE id=?) "
                                   "ORDER BY rowid DESC LIMIT ?", (after, limit))
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY rowid DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def active_jobs(self) -> list[str]:
        """Ids of jobs not yet in a final state, oldest first (the order they are fed in)."""
        marks = ",".join("?" * len(ACTIVE))
        return [r[0] for r in self.db.execute(f"SELECT id FROM jobs WHERE status IN ({marks}) ORDER BY rowid",
                                              ACTIVE)]

    def set_status(self, job_id: str, new: str, now: int, errors: list | None = None) -> None:
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or new not in ALLOWED[row[0]]:
                raise StoreError(f"job {job_id}: illegal transition {row and row[0]} -> {new}")
            db.execute(f"UPDATE jobs SET status=?, {new}_at=?, errors=COALESCE(?, errors) WHERE id=?",
                       (new, now, json.dumps({"object": "list", "data": errors}) if errors else None, job_id))

    # ------------------------------------------------------------ requests
    def next_lines(self, job: dict, limit: int) -> list[tuple[int, str, str, bool]]:
        """Up to `limit` lines to start: requeued (pending) ones first, then new ones from the
        job's cursor. Items: (line_no, custom_id, text, new)."""
        out = [(r[0], r[1], r[2], False) for r in self.db.execute(
            "SELECT r.line_no, r.custom_id, f.text FROM requests r JOIN file_lines f ON f.file_id=? "
            "AND f.line_no=r.line_no WHERE r.job_id=? AND r.state='pending' ORDER BY r.line_no LIMIT ?",
            (job["input_file_id"], job["id"], limit))]
        if len(out) < limit:
            out += [(r[0], r[1], r[2], True) for r in self.db.execute(
                "SELECT line_no, custom_id, text FROM file_lines WHERE file_id=? AND line_no>=? "
                "ORDER BY line_no LIMIT ?", (job["input_file_id"], job["next_line"], limit - len(out)))]
        return out

    def mark_running(self, job_id: str, rows: list[tuple[int, str, str]], next_line: int) -> None:
        """(line_no, custom_id, request_id) rows are now in flight; the cursor moves to next_line."""
        with self._tx() as db:
            db.executemany("INSERT INTO requests (job_id, line_no, custom_id, state, attempts, request_id) "
                           "VALUES (?, ?, ?, 'running', 1, ?) ON CONFLICT (job_id, line_no) DO UPDATE SET "
                           "state='running', attempts=attempts+1, request_id=excluded.request_id",
                           [(job_id, n, cid, rid) for n, cid, rid in rows])
            db.execute("UPDATE jobs SET next_line=MAX(next_line, ?) WHERE id=?", (next_line, job_id))

    def finish(self, results: list[dict]) -> list[dict]:
        """Record final results ({job_id, line_no, state: completed|failed, status_code, response:
        JSON text, prompt_tokens, completion_tokens, finished_at}) in one transaction. Only
        rows still 'running' are written; returns the results that were."""
        applied = []
        with self._tx() as db:
            for r in results:
                cur = db.execute(
                    "UPDATE requests SET state=?, status_code=?, response=?, prompt_tokens=?, completion_tokens=?, "
                    "finished_at=? WHERE job_id=? AND line_no=? AND state='running'",
                    (r["state"], r["status_code"], r["response"], r["prompt_tokens"], r["completion_tokens"],
                     r["finished_at"], r["job_id"], r["line_no"]))
                if cur.rowcount:
                    ok = r["state"] == "completed"
                    db.execute("UPDATE jobs SET completed=completed+?, failed=failed+?, prompt_tokens=prompt_tokens+?,"
                               " completion_tokens=completion_tokens+? WHERE id=?",
                               (int(ok), int(not ok), r["prompt_tokens"], r["completion_tokens"], r["job_id"]))
                    applied.append(r)
        return applied

    def requeue(self, job_id: str, line_nos: list[int]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE requests SET state='pending' WHERE job_id=? AND line_no=? AND state='running'",
                           [(job_id, n) for n in line_nos])

    def cancel_unfinished(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE requests SET state='cancelled' WHERE job_id=? AND state IN ('pending', 'running')",
                       (job_id,))

    def output_page(self, job_id: str, after: int, limit: int) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT line_no, custom_id, request_id, status_code, response FROM requests WHERE job_id=? "
            "AND state='completed' AND line_no>? ORDER BY line_no LIMIT ?", (job_id, after, limit)).fetchall()

    def error_page(self, job: dict, after: int, limit: int) -> list[sqlite3.Row]:
        """Failed requests; for a job that ended early (cancelled, failed) also every line
        that never finished (state NULL: never started)."""
        if job["status"] in ("cancelled", "failed"):
            return self.db.execute(
                "SELECT f.line_no, f.custom_id, r.request_id, r.status_code, r.response, r.state FROM file_lines f "
                "LEFT JOIN requests r ON r.job_id=? AND r.line_no=f.line_no WHERE f.file_id=? AND f.line_no>? "
                "AND (r.state IS NULL OR r.state != 'completed') ORDER BY f.line_no LIMIT ?",
                (job["id"], job["input_file_id"], after, limit)).fetchall()
        return self.db.execute(
            "SELECT line_no, custom_id, request_id, status_code, response, state FROM requests WHERE job_id=? "
            "AND state='failed' AND line_no>? ORDER BY line_no LIMIT ?", (job["id"], after, limit)).fetchall()

    def request_states(self, job_id: str) -> dict[str, int]:
        """Rows per state (lines never started have no row). For tests and diagnostics."""
        return dict(self.db.execute("SELECT state, COUNT(*) FROM requests WHERE job_id=? GROUP BY state",
                                    (job_id,)).fetchall())


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["metadata"] = json.loads(job["metadata"]) if job["metadata"] else None
    job["errors"] = json.loads(job["errors"]) if job["errors"] else None
    return job
