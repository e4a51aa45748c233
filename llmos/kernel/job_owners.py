"""Files and batches belong to the principal that made them (kernel/auth.py): another sees
none of them, not even that they exist. The kernel asks this module before it hands a jobs
command or query to the job manager; the admin sees everything.

Owners live in jobs.db's `owners` table (ids and principal names only: nothing to encrypt).
A file or batch made before this table existed belongs to the admin.
"""
from __future__ import annotations

import sqlite3

from llmos.kernel.auth import Principal
from llmos.kernel.jobs.refusals import Refused

MINE_BY_ID = {"files.append", "files.commit", "files.discard", "files.delete", "files.get", "files.page",
              "jobs.get", "jobs.cancel", "jobs.delete"}
NONE_WHEN_NOT_MINE = {"files.get", "files.page", "jobs.get", "jobs.cancel"}   # they answer None for "no such"
CREATES = {"files.begin", "jobs.create"}
LISTS = {"files.list": "data", "jobs.list": None}   # where the list is in the answer


class JobOwners:
    def __init__(self, db_path):
        self.db = sqlite3.connect(str(db_path), timeout=5, isolation_level=None, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL) WITHOUT ROWID")

    def owner(self, obj_id) -> str | None:
        row = self.db.execute("SELECT owner FROM owners WHERE id = ?", (obj_id,)).fetchone() \
            if isinstance(obj_id, str) else None
        return row[0] if row else None

    def scoped(self, what: str, handler, principal: Principal):
        """`handler` wrapped for `principal`: its own objects only."""
        def run(args: dict):
            mine = lambda obj_id: principal.admin or self.owner(obj_id) == principal.name   # noqa: E731
            if what in MINE_BY_ID and not mine(args.get("id")):
                if what in NONE_WHEN_NOT_MINE:
                    return None
                if what.startswith("files."):   # the very refusal of an id that does not exist
                    raise Refused("file_not_found", f"No such file: {str(args.get('id'))[:100]}")
                raise Refused("batch_not_found", f"No such batch: {str(args.get('id'))[:100]}")
            if what == "jobs.create" and not mine(args.get("input_file_id")):
                raise ValueError(f"input_file_id: no file {str(args.get('input_file_id'))[:100]!r}")
            answer = handler(args)
            if what in CREATES and isinstance(answer, dict) and isinstance(answer.get("id"), str):
                self.db.execute("INSERT OR REPLACE INTO owners VALUES (?, ?)", (answer["id"], principal.name))
                if what == "jobs.create":   # its output and error files are the job's owner's too
                    for key in ("output_file_id", "error_file_id"):
                        if isinstance(answer.get(key), str):
                            self.db.execute("INSERT OR REPLACE INTO owners VALUES (?, ?)", (answer[key], principal.name))
            if what in LISTS and not principal.admin:
                return self._filter(answer, LISTS[what], mine)
            return answer
        return run

    @staticmethod
    def _filter(answer, key, mine):
        if key is None and isinstance(answer, list):
            return [x for x in answer if isinstance(x, dict) and mine(x.get("id"))]
        if isinstance(answer, dict) and isinstance(answer.get(key), list):
            return {**answer, key: [x for x in answer[key] if isinstance(x, dict) and mine(x.get("id"))]}
        return answer

    def close(self) -> None:
        self.db.close()
