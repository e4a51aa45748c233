"""The HMAC key: a file kept apart from the log (another directory, ideally another disk or
a secret store's mount), readable by its owner only. Without the key nobody can re-chain an
edited log so that verify with the key accepts it."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from llmos.audit.chain import AuditError

ENV_KEY_FILE = "LLMOS_AUDIT_KEY_FILE"
MIN_KEY_BYTES = 16


def key_file_setting(configured: str | os.PathLike | None = None) -> Path | None:
    """The key file to use: the configured path, else $LLMOS_AUDIT_KEY_FILE, else none."""
    value = configured or os.environ.get(ENV_KEY_FILE)
    return Path(value).expanduser() if value else None


def load_key(path: str | os.PathLike) -> bytes:
    """The key: the file's bytes without surrounding whitespace (so `openssl rand -hex 32 >F`
    works). Refused when others may read the file, or when fewer than 16 bytes remain."""
    path = Path(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"audit key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AuditError(f"audit key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise AuditError(f"audit key file {path} has mode {st.st_mode & 0o777:04o}; "
                         f"others must not read it: chmod 600 {path}")
    key = data.strip()
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(f"audit key file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def generate_key(path: str | os.PathLike) -> Path:
    """Write a new random key (32 bytes as hex) to a new 0600 file; never overwrites one."""
    path = Path(path).expanduser()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
