"""Re-sealing the job store under the current storage key, while the daemon serves.

    start: (rotate) a new key goes first in the key file, so every write from now on is
           sealed with it; the old keys stay readable
    step:  one small transaction looks at the next RESEAL_ROWS rows and re-seals those still
           sealed with an old key (or plaintext, in a schema 1 store), RESEAL_BYTES at most
    done:  the WAL is checkpointed (so the re-sealed rows are in the database file, synced),
           then the old keys are dropped from the key file

One pass suffices: from `start` on, every write uses the new key. A crash in between
leaves the key file with both keys and the kernel's next start resumes the pass; each
step is idempotent. A value that opens with no key we have (tampered, or sealed with a
key that was lost) is left as it is and counted as unreadable. A store made by schema 1
(plaintext) is sealed by one pass at the kernel's start, then VACUUMed (erasure.py).
"""
from __future__ import annotations

import logging
import time

from llmos.kernel.jobs.refusals import Refused
from llmos.kernel.jobs.sealing import Keyring, StorageKeyError, Unreadable, record

log = logging.getLogger(__name__)
RESEAL_ROWS = 256
RESEAL_BYTES = 8 * 1024 * 1024   # and at most about this much plaintext per step
OFFLINE_WAIT_S = 10.0
# table, primary key, sealed columns (every sealed value of the store; see store.py)
SEALED = [("files", ("id",), ("filename", "idem_digest")),
          ("jobs", ("id",), ("metadata", "errors", "idem_digest")),
          ("file_lines", ("file_id", "line_no"), ("custom_id", "text")),
          ("requests", ("job_id", "line_no"), ("custom_id", "response"))]


class Resealer:
    def __init__(self, store):
        self.store = store
        self.active = False
        self.table, self.cursor = 0, None
        self.resealed = self.unreadable = 0
        self.started_at = self.finished_at = None
        self.dropped: list[str] = []

    @property
    def keys(self) -> Keyring:
        return self.store.keys

    def needed(self) -> bool:
        """Whether a pass is due without being asked: more than one key, or plaintext rows."""
        return len(self.keys.keys) > 1 or self.store.legacy

    def rotate(self, args: dict) -> dict:
        """storage.rotate: a new key (key file only) and a pass that re-seals every row with it."""
        if self.active:
            raise Refused("rotation_running", f"a rotation to key {self.keys.current.hex()} is under way "
                                              f"({self.resealed} values re-sealed so far)")
        if self.keys.source == "file":
            try:
                self.keys.add_new_key()
            except OSError as exc:
                raise Refused("storage_unavailable", f"cannot write {self.keys.path}: {exc.strerror or exc}") from None
        self.start()
        return self.status()

    def start(self) -> None:
        self.active, self.table, self.cursor = True, 0, None
        self.resealed = self.unreadable = 0
        self.started_at, self.finished_at, self.dropped = time.time(), None, []
        log.info("storage: re-sealing the job store with key %s", self.keys.current.hex())

    def step(self, rows: int = RESEAL_ROWS) -> bool:
        """Re-seal up to `rows` rows; True while the pass has more to do at once (`active`
        says whether it is over)."""
        if not self.active:
            return False
        if self.table < len(SEALED):
            if not self._step_table(*SEALED[self.table], rows):
                self.table, self.cursor = self.table + 1, None
            return True
        if not self.store.checkpoint():   # another process reads the store: the old keys stay; next round
            return False
        self.dropped = self.keys.drop_old_keys()
        if self.store.legacy:   # every row is sealed: now the plaintext left in free space goes
            self.store.vacuum_all()
            with self.store._tx():
                self.store.set_meta("legacy_plaintext", None)
            self.store.legacy = False
        self.active, self.finished_at = False, time.time()
        log.info("storage: every value is sealed with key %s (%d re-sealed, %d unreadable; old keys %s)",
                 self.keys.current.hex(), self.resealed, self.unreadable, ", ".join(self.dropped) or "none")
        return False

    def _step_table(self, table: str, pk: tuple, cols: tuple, limit: int) -> bool:
        """The next `limit` rows after the cursor (in primary key order), of which those with
        stale values are re-sealed, up to RESEAL_BYTES of them; True if the table goes on."""
        keys, where = ", ".join(pk), " AND ".join(f"{p}=?" for p in pk)
        stale = ", ".join(f"CASE WHEN {c} IS NOT NULL AND (typeof({c})!='blob' OR substr({c}, 2, 4)!=:kid) "
                          f"THEN length({c}) END" for c in cols)   # (the length of a stale value, else NULL)
        after = f"WHERE ({keys}) > ({', '.join(':c%d' % i for i in range(len(pk)))})" if self.cursor else ""
        args = {"kid": self.keys.current, "limit": limit, **{f"c{i}": v for i, v in enumerate(self.cursor or ())}}
        with self.store._tx() as db:
            rows = db.execute(f"SELECT {keys}, {stale} FROM {table} {after} ORDER BY {keys} LIMIT :limit",
                              args).fetchall()
            size, seen = 0, 0
            for row in rows:
                if size >= RESEAL_BYTES:
                    break
                seen += 1
                key, todo = tuple(row[:len(pk)]), [c for c, n in zip(cols, row[len(pk):]) if n is not None]
                if not todo:
                    continue
                values = db.execute(f"SELECT {', '.join(todo)} FROM {table} WHERE {where}", key).fetchone()
                sets = {}
                for col, value in zip(todo, values):
                    name = record(table, col, *key)
                    plain = self.store.open(name, value, raw=True)
                    if isinstance(plain, Unreadable):
                        self.unreadable += 1
                    else:
                        sets[col] = self.store.seal(name, plain)
                        size += len(plain)
                if sets:
                    db.execute(f"UPDATE {table} SET {', '.join(f'{c}=?' for c in sets)} WHERE {where}",
                               (*sets.values(), *key))
                    self.resealed += len(sets)
        if seen:
            self.cursor = tuple(rows[seen - 1][:len(pk)])
        return seen < len(rows) or len(rows) == limit

    def status(self) -> dict:
        k = self.keys
        note = None
        if not self.active and self.dropped and k.source != "file":
            note = f"keys {', '.join(self.dropped)} are no longer needed: remove them from the key's source"
        return {"key_id": k.current.hex(), "key_ids": k.ids, "source": k.source, "rotating": self.active,
                "table": SEALED[self.table][0] if self.active and self.table < len(SEALED) else None,
                "resealed": self.resealed, "unreadable": self.unreadable, "started_at": self.started_at,
                "finished_at": self.finished_at, "dropped_key_ids": self.dropped, "note": note,
                "legacy_plaintext": self.store.legacy}


def rotate_offline(store, new_key: bool = True, rows: int = RESEAL_ROWS) -> dict:
    """A whole pass at once: for a store no daemon has open (`llmos keys rotate-storage`
    without a daemon; then `new_key`), or at the kernel's start for a schema 1 store."""
    r = Resealer(store)
    if new_key:
        try:
            r.rotate({})
        except Refused as exc:
            raise StorageKeyError(str(exc)) from None
    else:
        r.start()
    deadline = time.monotonic() + OFFLINE_WAIT_S
    while r.active:
        if not r.step(rows) and r.active:   # another process holds the WAL
            if time.monotonic() > deadline:
                raise StorageKeyError("every value is re-sealed, but another process keeps the job store open, so "
                                      "the old key stays for now: run this again, or start the daemon (it finishes)")
            time.sleep(0.1)
    return r.status()
