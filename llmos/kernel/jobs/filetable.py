"""The store's uploaded files (tables files and file_lines): a part of JobStore (store.py),
which provides db, _tx, seal and open.

custom_ids are sealed, so the database cannot index them; duplicates within an upload are
found in a temporary table of keyed digests instead (the key is the upload's own, random,
never stored), dropped when the upload ends.
"""
from __future__ import annotations

import hashlib
import hmac

from llmos.kernel.jobs.sealing import Unreadable, record
from llmos.kernel.jobs.states import ACTIVE

_UPLOAD_IDS = ("CREATE TEMP TABLE IF NOT EXISTS upload_ids (file_id TEXT NOT NULL, digest BLOB NOT NULL, "
               "line_no INTEGER NOT NULL, PRIMARY KEY (file_id, digest)) WITHOUT ROWID")


class FileTable:
    def begin_file(self, file_id: str, filename: str, purpose: str, now: int) -> None:
        with self._tx() as db:
            db.execute(_UPLOAD_IDS)
            db.execute("INSERT INTO files (id, filename, purpose, created_at) VALUES (?, ?, ?, ?)",
                       (file_id, self.seal(record("files", "filename", file_id), filename), purpose, now))

    def add_lines(self, file_id: str, rows: list[tuple[int, str, str]], upload_key: bytes) -> list[tuple[int, str]]:
        """Insert (line_no, custom_id, text) rows; returns (line_no, message) for duplicates.
        `upload_key`: the upload's secret for its custom_id digests."""
        errors = []
        with self._tx() as db:
            db.execute(_UPLOAD_IDS)
            for line_no, custom_id, text in rows:
                digest = hmac.digest(upload_key, custom_id.encode(), hashlib.sha256)[:16]
                first = db.execute("SELECT line_no FROM upload_ids WHERE file_id=? AND digest=?",
                                   (file_id, digest)).fetchone()
                if first is not None:
                    errors.append((line_no, f"duplicate custom_id {custom_id!r} (first on line {first[0]})"))
                    continue
                db.execute("INSERT INTO upload_ids VALUES (?, ?, ?)", (file_id, digest, line_no))
                db.execute("INSERT INTO file_lines VALUES (?, ?, ?, ?)",
                           (file_id, line_no, self.seal(record("file_lines", "custom_id", file_id, line_no), custom_id),
                            self.seal(record("file_lines", "text", file_id, line_no), text)))
        return errors

    def commit_file(self, file_id: str, nbytes: int, lines: int, endpoint: str, expires_at: int | None = None,
                    idem: tuple[str, bytes] | None = None) -> None:
        """`idem`: (idempotency key, digest of the upload) a retry is compared with."""
        with self._tx(durable=True) as db:
            db.execute("UPDATE files SET complete=1, bytes=?, lines=?, endpoint=?, expires_at=?, idem_key=?, "
                       "idem_digest=? WHERE id=? AND complete=0",
                       (nbytes, lines, endpoint, expires_at, idem and idem[0],
                        self.seal(record("files", "idem_digest", file_id), idem and idem[1]), file_id))
            self._forget_upload(db, file_id)

    def discard_file(self, file_id: str) -> None:
        """Drop an upload that did not finish (finished files are kept); its lines are erased
        by the next erasure steps."""
        with self._tx() as db:
            if db.execute("DELETE FROM files WHERE id=? AND complete=0", (file_id,)).rowcount:
                db.execute("INSERT OR IGNORE INTO trash VALUES ('file', ?)", (file_id,))
            self._forget_upload(db, file_id)

    @staticmethod
    def _forget_upload(db, file_id: str) -> None:
        db.execute(_UPLOAD_IDS)
        db.execute("DELETE FROM upload_ids WHERE file_id=?", (file_id,))

    def get_file(self, file_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM files WHERE id=? AND complete=1", (file_id,)).fetchone()
        return self._file(row) if row else None

    def file_by_key(self, key: str) -> tuple[str, bytes | Unreadable] | None:
        """(file id, upload digest) of the finished file uploaded with idempotency key `key`."""
        row = self.db.execute("SELECT id, idem_digest FROM files WHERE idem_key=? AND complete=1", (key,)).fetchone()
        return (row[0], self.open(record("files", "idem_digest", row[0]), row[1], raw=True)) if row else None

    def list_files(self, limit: int, after: str | None = None, newest_first: bool = True,
                   purpose: str | None = None) -> list[dict]:
        """Finished files in order of creation; `after`: the last id of the previous page."""
        op, order = ("<", "DESC") if newest_first else (">", "ASC")
        where, args = ["complete=1"], []
        if after:
            where.append(f"rowid {op} COALESCE((SELECT rowid FROM files WHERE id=?), {-1 if op == '>' else 2**62})")
            args.append(after)
        if purpose:
            where.append("purpose=?")
            args.append(purpose)
        rows = self.db.execute(f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY rowid {order} LIMIT ?",
                               (*args, limit))
        return [self._file(r) for r in rows]

    def file_page(self, file_id: str, after: int, limit: int) -> list[tuple[int, str | Unreadable]]:
        return [(r[0], self._text(file_id, r[0], r[1])) for r in self.db.execute(
            "SELECT line_no, text FROM file_lines WHERE file_id=? AND line_no>? ORDER BY line_no LIMIT ?",
            (file_id, after, limit))]

    def file_users(self, file_id: str, active_only: bool = False) -> list[str]:
        """Jobs that read the file (with `active_only`, those not yet ended)."""
        sql = "SELECT id FROM jobs WHERE input_file_id=?" + (" AND status IN (?, ?, ?)" if active_only else "")
        return [r[0] for r in self.db.execute(sql, (file_id, *ACTIVE) if active_only else (file_id,))]

    def _file(self, row) -> dict:
        f = dict(row)
        name = self.open(record("files", "filename", f["id"]), f["filename"])
        f["filename"] = name if isinstance(name, str) else "(unreadable)"
        del f["idem_digest"]
        return f

    def _cid(self, file_id: str, line_no: int, value):
        return self.open(record("file_lines", "custom_id", file_id, line_no), value)

    def _text(self, file_id: str, line_no: int, value):
        return self.open(record("file_lines", "text", file_id, line_no), value)
