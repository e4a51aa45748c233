"""Deletion that deletes: a part of JobStore (store.py), which provides db and _tx.

A deleted file or job leaves the API at once: its row goes, and in the same transaction a
`trash` entry names what is left (its lines, its request rows). `erase_some` deletes those
a bounded number at a time, so a million-line file never stalls the kernel's loop; the
trash survives a restart, so nothing deleted comes back.

Erasure: the connection runs with secure_delete=ON, so SQLite overwrites deleted content
with zeros in the pages it rewrites; once the trash is empty `checkpoint` copies those
pages into the database file and truncates the WAL (which held the earlier versions), so
neither file keeps a deleted value, not even sealed. Freed pages are returned to the file
system a few at a time by `vacuum_some` (auto_vacuum=INCREMENTAL, on databases created by
schema 2); a full VACUUM would rewrite the whole database on the kernel's loop, and is not
needed for erasure, except once for a store made by schema 1 (`vacuum_all`).
"""
from __future__ import annotations

from llmos.kernel.jobs.states import ACTIVE, ENDED_AT, TERMINAL

# what a trash entry leaves: table, its owner column, the size of a row's values (SQL)
TRASH = {"file": ("file_lines", "file_id", "length(custom_id) + length(text)"),
         "job": ("requests", "job_id", "length(custom_id) + COALESCE(length(response), 0)")}
ERASE_BYTES = 16 * 1024 * 1024


class Erasure:
    def delete_file(self, file_id: str) -> bool:
        """Delete a finished file (the caller checks that no unfinished job reads it)."""
        with self._tx() as db:
            if not db.execute("DELETE FROM files WHERE id=? AND complete=1", (file_id,)).rowcount:
                return False
            db.execute("INSERT OR IGNORE INTO trash VALUES ('file', ?)", (file_id,))
        return True

    def delete_job(self, job_id: str) -> bool:
        """Delete a job and its results (the caller checks that it has ended)."""
        with self._tx() as db:
            if not db.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount:
                return False
            db.execute("INSERT OR IGNORE INTO trash VALUES ('job', ?)", (job_id,))
        return True

    def trash_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM trash").fetchone()[0]

    def erase_some(self, limit: int, max_bytes: int = ERASE_BYTES) -> int:
        """Delete up to `limit` rows (and about `max_bytes` of values) left by deletions, in
        one transaction; returns how many."""
        done, size = 0, 0
        with self._tx() as db:
            for kind, ident in db.execute("SELECT kind, id FROM trash").fetchall():
                table, col, values = TRASH[kind]
                last = None
                for line_no, n in db.execute(f"SELECT line_no, {values} FROM {table} WHERE {col}=? ORDER BY line_no "
                                             "LIMIT ?", (ident, limit - done)):
                    last, done, size = line_no, done + 1, size + n
                    if size >= max_bytes:
                        break
                if last is not None:
                    db.execute(f"DELETE FROM {table} WHERE {col}=? AND line_no<=?", (ident, last))
                if done >= limit or size >= max_bytes:
                    break
                db.execute("DELETE FROM trash WHERE kind=? AND id=?", (kind, ident))
        return done

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it; False (at once: the loop must not
        wait) if another connection's reader or writer kept it from finishing."""
        self.db.execute("PRAGMA busy_timeout=0")
        try:
            busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self.db.execute("PRAGMA busy_timeout=5000")
        return not busy

    def vacuum_some(self, pages: int) -> int:
        """Return up to `pages` free pages to the file system; answers how many remain free."""
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:   # not INCREMENTAL: nothing to do
            return 0
        self.db.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
        return self.db.execute("PRAGMA freelist_count").fetchone()[0]

    def vacuum_all(self) -> None:
        """Rewrite the whole database (VACUUM), converting it to incremental auto-vacuum. Only
        for a store made by schema 1, once: its free pages and the free space in its pages may
        hold plaintext from before secure_delete. Slow on a big store: the kernel does it at
        start, before it serves (JobManager.resume)."""
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.db.execute("VACUUM")
        self.checkpoint()

    # ------------------------------------------------------------ what is due
    def expired_jobs(self, now: int) -> list[str]:
        """Running jobs whose completion window has passed."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM jobs WHERE status='in_progress' AND expires_at IS NOT NULL AND expires_at<=? "
            "ORDER BY rowid", (now,))]

    def jobs_ended_before(self, when: float, limit: int = 1000) -> list[str]:
        marks = ",".join("?" * len(TERMINAL))
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM jobs WHERE status IN ({marks}) AND {ENDED_AT}<=? ORDER BY rowid LIMIT ?",
            (*TERMINAL, when, limit))]

    def files_due(self, now: int, created_before: float | None, limit: int = 1000) -> list[str]:
        """Finished files past their expires_at, or (retention) created before `created_before`,
        that no unfinished job reads."""
        cond = "expires_at IS NOT NULL AND expires_at<=?" + (" OR created_at<=?" if created_before is not None else "")
        args = (now,) + ((created_before,) if created_before is not None else ())
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM files f WHERE complete=1 AND ({cond}) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
            "j.input_file_id=f.id AND j.status IN (?, ?, ?)) LIMIT ?", (*args, *ACTIVE, limit))]
