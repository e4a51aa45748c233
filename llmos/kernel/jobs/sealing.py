"""Encryption at rest for the job store: the storage keys and sealed records (AES-256-GCM).

A sealed value is  version (1 byte, 1) | key id (4 bytes) | nonce (12 random bytes) |
ciphertext + tag (16 bytes).  The authenticated data is the record's name,
"TABLE.COLUMN:ID" (`record()`), so a value moved to another row, column or table does not
open: a swapped or edited value is refused (Unreadable), never read as something else.

The keys, first found wins:
    $LLMOS_STORAGE_KEY                        base64 keys, comma-separated
    $CREDENTIALS_DIRECTORY/llmos-storage-key   (systemd LoadCredential=) one base64 key a line
    $LLMOS_HOME/storage.key                    the same format; created 0600 on first use
The first key is the current one (it seals); the others only open, while a rotation
re-seals what they sealed (rotation.py). Only the key file can be rewritten by llmos; keys
from the environment or a credential are changed by whoever provides them.

A key id is the first 4 bytes of SHA-256("llmos storage key id" + key): it tells keys
apart and says nothing about them. No torch, no I/O beyond the key file.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
KEY_BYTES, ID_BYTES, NONCE_BYTES, TAG_BYTES = 32, 4, 12, 16
HEADER = 1 + ID_BYTES + NONCE_BYTES
ENV_KEY = "LLMOS_STORAGE_KEY"
CREDENTIAL = "llmos-storage-key"
KEY_FILE = "storage.key"
_FILE_NOTE = (b"# llmos storage keys (base64): the first seals, the others only open until a rotation "
              b"finishes. Losing this file loses the job store.\n")


class StorageKeyError(RuntimeError):
    """No usable storage key (a malformed key, a key file others may read), or a change of
    keys that their source does not allow."""


class Unreadable(ValueError):
    """A sealed value that does not open: sealed with a key we do not have, or altered."""


def record(table: str, column: str, *key) -> str:
    """The authenticated name of a value: "files.filename:file-abc", "requests.response:batch_x/7"."""
    return f"{table}.{column}:" + "/".join(str(k) for k in key)


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"llmos storage key id" + key).digest()[:ID_BYTES]


class Keyring:
    """The storage keys of one home. `source` is "env", "credential" or "file" (then `path`)."""

    def __init__(self, keys: list[bytes], source: str, path: Path | None = None):
        if not keys:
            raise StorageKeyError(f"no storage key in {path or source}")
        self.source, self.path = source, path
        self._set(keys)

    def _set(self, keys: list[bytes]) -> None:
        self.keys = list(dict.fromkeys(keys))           # in order, without repeats
        self._aead = {key_id(k): AESGCM(k) for k in self.keys}
        self.current = key_id(self.keys[0])

    @property
    def ids(self) -> list[str]:
        return [key_id(k).hex() for k in self.keys]

    # ------------------------------------------------------------ sealing
    def seal(self, name: str, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return bytes([VERSION]) + self.current + nonce + self._aead[self.current].encrypt(nonce, data, name.encode())

    def open(self, name: str, blob: bytes) -> bytes:
        """The plaintext of `blob` sealed as `name`; raises Unreadable."""
        if not isinstance(blob, bytes) or len(blob) < HEADER + TAG_BYTES or blob[0] != VERSION:
            raise Unreadable(f"{name} is not a sealed value")
        kid = blob[1:1 + ID_BYTES]
        aead = self._aead.get(kid)
        if aead is None:
            raise Unreadable(f"{name} was sealed with key {kid.hex()}, which this daemon does not have")
        try:
            return aead.decrypt(blob[1 + ID_BYTES:HEADER], blob[HEADER:], name.encode())
        except InvalidTag:
            raise Unreadable(f"{name} does not open with key {kid.hex()}: it was altered or moved") from None

    @staticmethod
    def id_of(blob) -> bytes | None:
        return blob[1:1 + ID_BYTES] if isinstance(blob, bytes) and len(blob) >= HEADER else None

    # ------------------------------------------------------------ rotation (the key file only)
    def add_new_key(self) -> str:
        """A new random current key, written first in the key file before it seals anything;
        the old ones stay readable. Returns its id."""
        self._writable()
        keys = [os.urandom(KEY_BYTES), *self.keys]
        write_key_file(self.path, keys)
        self._set(keys)
        return self.current.hex()

    def drop_old_keys(self) -> list[str]:
        """Forget every key but the current one, in the key file too; returns their ids. Keys
        from the environment or a credential stay (their provider removes them)."""
        old = self.ids[1:]
        if old and self.source == "file":
            write_key_file(self.path, self.keys[:1])
            self._set(self.keys[:1])
        return old

    def _writable(self) -> None:
        if self.source != "file":
            where = ENV_KEY if self.source == "env" else f"the credential {CREDENTIAL}"
            raise StorageKeyError(f"the storage key comes from {where}: put a new key first there "
                                  f"(NEW,OLD), restart the daemon, then rotate to re-seal with it")


# ---------------------------------------------------------------- loading


def load_keyring(home: str | os.PathLike, create: bool = True) -> Keyring:
    """The keys for the store under `home`: from the environment, a systemd credential, or
    the key file (created, 0600, with one random key if there is none and `create`)."""
    if os.environ.get(ENV_KEY):
        return Keyring(_parse(os.environ[ENV_KEY].replace(",", "\n"), ENV_KEY), "env")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL).is_file():
        path = Path(creds) / CREDENTIAL
        return Keyring(_parse(path.read_text(), str(path)), "credential")
    path = Path(home) / KEY_FILE
    if not path.exists() and not create:
        raise StorageKeyError(f"{path} is missing, and the job store next to it was sealed with it: restore the "
                              f"file (or set {ENV_KEY}); to start afresh instead, move the job store away")
    if not path.exists():
        _create(path)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise StorageKeyError(f"storage key file {path} has mode {st.st_mode & 0o777:04o}; "
                              f"others must not read it: chmod 600 {path}")
    return Keyring(_parse(path.read_text(), str(path)), "file", path)


def _parse(text: str, where: str) -> list[bytes]:
    keys = []
    for n, raw in enumerate(text.splitlines(), start=1):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        try:
            key = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise StorageKeyError(f"{where}: key {n} is not base64") from None
        if len(key) != KEY_BYTES:
            raise StorageKeyError(f"{where}: key {n} has {len(key)} bytes; a storage key has {KEY_BYTES}")
        keys.append(key)
    if not keys:
        raise StorageKeyError(f"{where} holds no storage key")
    return keys


def _encode(keys: list[bytes]) -> bytes:
    return _FILE_NOTE + b"".join(base64.b64encode(k) + b"\n" for k in keys)


def _write_temp(path: Path, keys: list[bytes]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, _encode(keys))
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _sync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path) -> None:
    """A new key file with one random key; if another process made one first, theirs stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, [os.urandom(KEY_BYTES)])
    try:
        os.link(tmp, path)           # atomic, and never over an existing file
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    _sync_dir(path)


def write_key_file(path: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically (written, synced, renamed, directory synced)."""
    tmp = _write_temp(path, keys)
    os.replace(tmp, path)
    _sync_dir(path)
