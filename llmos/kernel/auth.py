"""Who is asking, and what they may do: principals from peer credentials and API keys.

A request reaches the kernel with the Credentials the io driver saw (protocol.Credentials):

  - an API key (Authorization: Bearer llmos-...): the key's principal. Keys live hashed
    (SHA-256 of a 256-bit random secret; a slow KDF buys nothing for secrets that long) in
    $LLMOS_HOME/keys.db, and are compared in constant time. Unknown, revoked or expired: 401.
  - no key, on the Unix socket: the daemon's own uid is the admin; another local uid is the
    default principal if --allow-local-users, else 401. Over TCP a key is always needed.

A Principal bounds a request: its tenant (the body may only repeat it), its models, the
highest priority class it may ask for, and whether it may use the admin API.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass

from llmos import names, protocol

KEY_PREFIX = "llmos-"
DEFAULT_TENANT = "default"
RELOAD_S = 1.0   # a created or revoked key takes effect within this long
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL, models TEXT,
    max_priority TEXT NOT NULL, admin INTEGER NOT NULL, created_at REAL NOT NULL,
    expires_at REAL, revoked_at REAL, note TEXT NOT NULL DEFAULT '')
"""


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    name: str                       # "uid:1000", "key:k3f9a2", "kernel"
    tenant: str | None              # None: the body's tenant (the admin, in-kernel clients)
    models: frozenset | None        # None: every model
    max_class: int                  # the best priority class it may ask for (0 realtime)
    admin: bool

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def owns(self, owner: str) -> bool:
        return self.admin or owner == self.name


KERNEL = Principal("kernel", None, None, 0, True)   # in-kernel clients: jobs, canaries


@dataclass(frozen=True)
class KeyRow:
    id: str
    tenant: str
    models: tuple | None
    max_priority: str
    admin: bool
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    note: str


class KeyStore:
    """The API keys of one $LLMOS_HOME (SQLite, 0600)."""
    def __init__(self, path):
        self.path = str(path)
        with self._db() as db:
            db.execute(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        fresh = not os.path.exists(self.path)
        db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)
        return db

    def create(self, tenant: str, models=None, max_priority: str = "interactive", admin: bool = False,
               expires_s: float | None = None, note: str = "") -> tuple[str, KeyRow]:
        """A new key: (its secret, shown once; its row)."""
        if max_priority not in names.PRIORITY_CLASSES:
            raise ValueError(f"max_priority must be one of {', '.join(names.PRIORITY_CLASSES)}")
        if not tenant or len(tenant) > 64:
            raise ValueError("tenant must be 1 to 64 characters")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        kid = "k" + secrets.token_hex(4)
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                       (kid, digest(secret), tenant, ",".join(models) if models else None, max_priority,
                        int(admin), now, None if expires_s is None else now + expires_s, note))
        return secret, self.get(kid)

    def get(self, kid: str) -> KeyRow:
        rows = [r for r in self.rows() if r.id == kid]
        if not rows:
            raise KeyError(f"no key {kid!r}")
        return rows[0]

    def rows(self) -> list[KeyRow]:
        with self._db() as db:
            found = db.execute("SELECT id, tenant, models, max_priority, admin, created_at, expires_at, revoked_at, "
                               "note FROM keys ORDER BY created_at").fetchall()
        return [KeyRow(r[0], r[1], tuple(r[2].split(",")) if r[2] else None, r[3], bool(r[4]), *r[5:]) for r in found]

    def revoke(self, kid: str) -> None:
        with self._db() as db:
            if db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                          (time.time(), kid)).rowcount != 1:
                raise KeyError(f"no key {kid!r} to revoke")

    def by_digest(self) -> dict[str, tuple]:
        with self._db() as db:
            return {r[0]: r[1:] for r in db.execute(
                "SELECT sha256, id, tenant, models, max_priority, admin, expires_at, revoked_at FROM keys")}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class Authority:
    def __init__(self, store: KeyStore, admin_uid: int, allow_local_users: bool = False, clock=time.time):
        self.store, self.admin_uid, self.allow_local_users, self.clock = store, admin_uid, allow_local_users, clock
        self._keys: dict[str, tuple] = {}
        self._loaded_at = float("-inf")
        self.failures = 0

    def principal(self, creds: protocol.Credentials | None) -> Principal:
        """The principal of these credentials, or AuthError(401)."""
        if creds is None:
            raise AuthError(401, "no credentials (an io driver without access control?)")
        if creds.key_sha256 is not None:
            return self._key_principal(creds.key_sha256)
        if creds.transport == "unix" and creds.uid is not None:
            if creds.uid == self.admin_uid:
                return Principal(f"uid:{creds.uid}", None, None, 0, True)
            if self.allow_local_users:
                return Principal(f"uid:{creds.uid}", DEFAULT_TENANT, None, 1, False)
            self.failures += 1
            raise AuthError(401, f"local user {creds.uid} needs an API key (Authorization: Bearer ...), "
                                 "or the daemon's --allow-local-users")
        self.failures += 1
        raise AuthError(401, "an API key is required (Authorization: Bearer ...)")

    def _key_principal(self, sha: str) -> Principal:
        now = self.clock()
        if now - self._loaded_at >= RELOAD_S:
            self._keys, self._loaded_at = self.store.by_digest(), now
        row = None
        for stored, candidate in self._keys.items():   # every digest, in constant time each
            if hmac.compare_digest(stored, sha):
                row = candidate
        if row is None:
            self.failures += 1
            raise AuthError(401, "invalid API key")
        kid, tenant, models, max_priority, admin, expires_at, revoked_at = row
        if revoked_at is not None or (expires_at is not None and now >= expires_at):
            self.failures += 1
            raise AuthError(401, f"API key {kid} is {'revoked' if revoked_at is not None else 'expired'}")
        return Principal(f"key:{kid}", tenant, frozenset(models.split(",")) if models else None,
                         names.PRIORITY_CLASSES.index(max_priority), bool(admin))
