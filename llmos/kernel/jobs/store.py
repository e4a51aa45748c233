"""The job store: one SQLite database in write-ahead-log mode ($LLMOS_HOME/jobs.db).

The kernel's JobManager is its only writer (design.md rule 1); every method is one
transaction, called from the kernel's event loop (each is short: a page of lines, one
step's results, a few hundred rows erased or re-sealed).

Durability: a finished upload and a new job are committed with synchronous=FULL (fsynced
before their ids are answered). Request states and results are committed with
synchronous=NORMAL: in WAL mode a committed transaction is in the OS when commit returns,
so it survives kill -9 of the daemon; a power cut may lose the last few results, which are
then recomputed. A result is never written twice: a line has one row (primary key
(job_id, line_no)) and a result is written only over state 'running'.

Request rows are created lazily, when a line is first started; lines at or after the
job's `next_line` have no row yet and count as pending.

At rest (sealing.py): every value that holds user data is sealed under its record name --
files.filename, file_lines.custom_id and .text (the requests: prompts), jobs.metadata and
.errors, requests.custom_id and .response (outputs, and errors that echo input), and both
idempotency digests. Ids, states, counts and times stay plain for the scheduler's queries.
A value that does not open is returned as an Unreadable (the caller reports it), never
guessed at. Deleted rows are zeroed in place (secure_delete) and the WAL is truncated after
each erasure (erasure.py), so neither the database nor its WAL keeps what was deleted.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

from llmos.kernel.jobs.erasure import Erasure
from llmos.kernel.jobs.filetable import FileTable
from llmos.kernel.jobs.sealing import Keyring, StorageKeyError, Unreadable, load_keyring, record
from llmos.kernel.jobs.states import ACTIVE, ALLOWED, ENDED_EARLY

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename BLOB NOT NULL, purpose TEXT NOT NULL, created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0, lines INTEGER NOT NULL DEFAULT 0, endpoint TEXT,
    complete INTEGER NOT NULL DEFAULT 0, expires_at INTEGER, idem_key TEXT, idem_digest BLOB);
CREATE TABLE IF NOT EXISTS file_lines (
    file_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id BLOB NOT NULL, text BLOB NOT NULL,
    PRIMARY KEY (file_id, line_no)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata BLOB, total INTEGER NOT NULL,
    next_line INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, in_progress_at INTEGER,
    finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER,
    cancelled_at INTEGER, errors BLOB, expires_at INTEGER, expired_at INTEGER, idem_key TEXT, idem_digest BLOB);
CREATE TABLE IF NOT EXISTS requests (
    job_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id BLOB NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, request_id TEXT, status_code INTEGER, response BLOB,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    finished_at REAL, PRIMARY KEY (job_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_state ON requests (job_id, state, line_no);
CREATE UNIQUE INDEX IF NOT EXISTS files_by_idem ON files (idem_key) WHERE idem_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idem ON jobs (idem_key) WHERE idem_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS trash (kind TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"""
# Schema 1 (plaintext) -> 2, before SCHEMA: new columns; the kernel seals its rows at start
# (JobManager.resume). Runs in one transaction with SCHEMA.
MIGRATE_1 = """
DROP INDEX IF EXISTS file_custom_ids;
ALTER TABLE files ADD COLUMN expires_at INTEGER; ALTER TABLE files ADD COLUMN idem_key TEXT;
ALTER TABLE files ADD COLUMN idem_digest BLOB;
ALTER TABLE jobs ADD COLUMN expires_at INTEGER; ALTER TABLE jobs ADD COLUMN expired_at INTEGER;
ALTER TABLE jobs ADD COLUMN idem_key TEXT; ALTER TABLE jobs ADD COLUMN idem_digest BLOB;
"""


class StoreError(RuntimeError):
    """A request to the store that breaks its rules (an illegal job transition)."""


class JobStore(FileTable, Erasure):
    def __init__(self, path: str | os.PathLike, keys: Keyring | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # private before the first byte
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise StoreError(f"{self.path} has schema version {version}; this llmos knows {SCHEMA_VERSION}")
        try:   # a sealed store whose key file is gone must not get a new key: its data would be lost unseen
            self.keys = keys or load_keyring(self.path.parent, create=version != SCHEMA_VERSION)
            if version == SCHEMA_VERSION and keys is None:
                self._check_key()
        except BaseException:
            self.db.close()
            raise
        if version == 0:
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")   # (only possible before the first table)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.execute("PRAGMA secure_delete=ON")              # deleted content is overwritten with zeros
        before, after = (MIGRATE_1, "INSERT OR REPLACE INTO meta VALUES ('legacy_plaintext', '1');") \
            if version == 1 else ("", "")
        try:
            self.db.executescript(f"BEGIN; {before} {SCHEMA} {after} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.Error:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.legacy = self.meta("legacy_plaintext") == "1"   # plaintext rows of schema 1 may remain

    def close(self) -> None:
        self.db.close()

    def _check_key(self) -> None:
        """Refuse keys that cannot open this store: the newest file was sealed with a key that
        is not among them (a wrong LLMOS_STORAGE_KEY would leave every row unreadable, and
        seal new rows with a key the next start may not have)."""
        row = self.db.execute("SELECT substr(filename, 2, 4) FROM files WHERE typeof(filename)='blob' "
                              "ORDER BY rowid DESC LIMIT 1").fetchone()
        if row and row[0].hex() not in self.keys.ids:
            raise StorageKeyError(f"{self.path} was sealed with storage key {row[0].hex()}, which is not among the "
                                  f"keys given ({', '.join(self.keys.ids)}, from {self.keys.source}): give that key, "
                                  "or move the job store away to start afresh")

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

    def meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str | None) -> None:
        self.db.execute("DELETE FROM meta WHERE name=?" if value is None else
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (name,) if value is None else (name, value))

    # ------------------------------------------------------------ sealing
    def seal(self, name: str, value: str | bytes | None) -> bytes | None:
        if value is None:
            return None
        return self.keys.seal(name, value.encode() if isinstance(value, str) else value)

    def open(self, name: str, value, raw: bool = False):
        """The plaintext (str, or bytes with `raw`) of a sealed value; None stays None; a
        value that does not open comes back as an Unreadable instance."""
        if value is None:
            return None
        if isinstance(value, str) and self.legacy:
            return value.encode() if raw else value
        try:
            data = self.keys.open(name, value)
        except Unreadable as exc:
            return exc
        return data if raw else data.decode()

    def recover(self) -> int:
        """At kernel start: requests that were running go back to pending (they are resent);
        uploads that never finished are dropped. Returns how many requests were requeued."""
        with self._tx() as db:
            n = db.execute("UPDATE requests SET state='pending' WHERE state='running'").rowcount
            db.execute("INSERT OR IGNORE INTO trash SELECT 'file', id FROM files WHERE complete=0")
            db.execute("DELETE FROM files WHERE complete=0")
        return n

    # ------------------------------------------------------------ jobs
    def create_job(self, job_id: str, file: dict, endpoint: str, window: str, metadata: dict | None,
                   now: int, expires_at: int | None = None, idem: tuple[str, bytes] | None = None) -> None:
        """Accept a job over a finished input file: committed and fsynced when this returns.
        `idem`: (idempotency key, digest of the request) a retry is compared with."""
        with self._tx(durable=True) as db:
            db.execute("INSERT INTO jobs (id, status, endpoint, input_file_id, completion_window, metadata, total,"
                       " created_at, in_progress_at, expires_at, idem_key, idem_digest)"
                       " VALUES (?, 'in_progress', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, endpoint, file["id"], window,
                        self.seal(record("jobs", "metadata", job_id), json.dumps(metadata) if metadata else None),
                        file["lines"], now, now, expires_at, idem and idem[0],
                        self.seal(record("jobs", "idem_digest", job_id), idem and idem[1])))

    def get_job(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def job_by_key(self, key: str) -> tuple[str, bytes | Unreadable] | None:
        """(job id, request digest) of the job created with idempotency key `key`."""
        row = self.db.execute("SELECT id, idem_digest FROM jobs WHERE idem_key=?", (key,)).fetchone()
        return (row[0], self.open(record("jobs", "idem_digest", row[0]), row[1], raw=True)) if row else None

    def list_jobs(self, limit: int = 100, after: str | None = None) -> list[dict]:
        """Newest first; `after` is a job id (the last one of the previous page)."""
        if after:
            rows = self.db.execute("SELECT * FROM jobs WHERE rowid < (SELECT rowid FROM jobs WHERE id=?) "
                                   "ORDER BY rowid DESC LIMIT ?", (after, limit))
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY rowid DESC LIMIT ?", (limit,))
        return [self._job(r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        return dict(self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

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
            sealed = self.seal(record("jobs", "errors", job_id),
                               json.dumps({"object": "list", "data": errors}) if errors else None)
            db.execute(f"UPDATE jobs SET status=?, {new}_at=?, errors=COALESCE(?, errors) WHERE id=?",
                       (new, now, sealed, job_id))

    def _job(self, row: sqlite3.Row) -> dict:
        job = dict(row)
        for col in ("metadata", "errors"):
            value = self.open(record("jobs", col, job["id"]), job[col])
            job[col] = json.loads(value) if isinstance(value, str) else None   # (unreadable: shown as none)
        del job["idem_digest"]
        return job

    # ------------------------------------------------------------ requests
    def next_lines(self, job: dict, limit: int) -> list[tuple]:
        """Up to `limit` lines to start: requeued (pending) ones first, then new ones from the
        job's cursor. Items: (line_no, custom_id, text, new); custom_id and text may be
        Unreadable."""
        fid = job["input_file_id"]
        out = [(r[0], self._cid(fid, r[0], r[1]), self._text(fid, r[0], r[2]), False) for r in self.db.execute(
            "SELECT r.line_no, f.custom_id, f.text FROM requests r JOIN file_lines f ON f.file_id=? "
            "AND f.line_no=r.line_no WHERE r.job_id=? AND r.state='pending' ORDER BY r.line_no LIMIT ?",
            (fid, job["id"], limit))]
        if len(out) < limit:
            out += [(r[0], self._cid(fid, r[0], r[1]), self._text(fid, r[0], r[2]), True) for r in self.db.execute(
                "SELECT line_no, custom_id, text FROM file_lines WHERE file_id=? AND line_no>=? "
                "ORDER BY line_no LIMIT ?", (fid, job["next_line"], limit - len(out)))]
        return out

    def mark_running(self, job_id: str, rows: list[tuple], next_line: int) -> None:
        """(line_no, custom_id, request_id) rows are now in flight; the cursor moves to next_line.
        An unreadable custom_id is stored as an empty value (it reads as unreadable)."""
        def cid(n, value):
            return self.seal(record("requests", "custom_id", job_id, n), value) if isinstance(value, str) else b""
        with self._tx() as db:
            db.executemany("INSERT INTO requests (job_id, line_no, custom_id, state, attempts, request_id) "
                           "VALUES (?, ?, ?, 'running', 1, ?) ON CONFLICT (job_id, line_no) DO UPDATE SET "
                           "state='running', attempts=attempts+1, request_id=excluded.request_id",
                           [(job_id, n, cid(n, c), rid) for n, c, rid in rows])
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
                    (r["state"], r["status_code"], self.seal(record("requests", "response", r["job_id"], r["line_no"]),
                                                             r["response"]),
                     r["prompt_tokens"], r["completion_tokens"], r["finished_at"], r["job_id"], r["line_no"]))
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

    def stop_unfinished(self, job_id: str, state: str = "cancelled") -> None:
        """Lines not finished (pending, running) end in `state` (cancelled, expired)."""
        with self._tx() as db:
            db.execute("UPDATE requests SET state=? WHERE job_id=? AND state IN ('pending', 'running')",
                       (state, job_id))

    def output_page(self, job_id: str, after: int, limit: int) -> list[dict]:
        return self._results(job_id, self.db.execute(
            "SELECT line_no, custom_id, request_id, status_code, response, state FROM requests WHERE job_id=? "
            "AND state='completed' AND line_no>? ORDER BY line_no LIMIT ?", (job_id, after, limit)))

    def error_page(self, job: dict, after: int, limit: int) -> list[dict]:
        """Failed requests; for a job that ended early (cancelled, failed, expired) also every
        line that never finished (state NULL: never started, while its input file exists)."""
        if job["status"] in ENDED_EARLY:
            rows = self.db.execute(
                "SELECT line_no, custom_id, request_id, status_code, response, state FROM requests WHERE job_id=? "
                "AND state != 'completed' AND line_no>? "
                "UNION ALL SELECT f.line_no, f.custom_id, NULL, NULL, NULL, NULL "
                "FROM file_lines f WHERE f.file_id=? AND f.line_no>? AND f.line_no>=? ORDER BY 1 LIMIT ?",
                (job["id"], after, job["input_file_id"], after, job["next_line"], limit)).fetchall()
            return self._results(job["id"], rows, job["input_file_id"])
        return self._results(job["id"], self.db.execute(
            "SELECT line_no, custom_id, request_id, status_code, response, state FROM requests WHERE job_id=? "
            "AND state='failed' AND line_no>? ORDER BY line_no LIMIT ?", (job["id"], after, limit)))

    def _results(self, job_id: str, rows, file_id: str | None = None) -> list[dict]:
        """Rows with custom_id and response opened; a row of state None (a line never
        started) carries its input line's custom_id."""
        out = []
        for r in rows:
            r = dict(r)
            if r["state"] is None:
                r["custom_id"] = self._cid(file_id, r["line_no"], r["custom_id"])
            else:
                r["custom_id"] = self.open(record("requests", "custom_id", job_id, r["line_no"]), r["custom_id"])
                r["response"] = self.open(record("requests", "response", job_id, r["line_no"]), r["response"])
            out.append(r)
        return out

    def request_states(self, job_id: str) -> dict[str, int]:
        """Rows per state (lines never started have no row). For tests and diagnostics."""
        return dict(self.db.execute("SELECT state, COUNT(*) FROM requests WHERE job_id=? GROUP BY state",
                                    (job_id,)).fetchall())
