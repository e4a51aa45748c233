"""The audit directory on disk: file names, modes, the anchor and torn tails.

    audit/                       0700
      audit-000001.jsonl         0600, one record per line, oldest first
      audit-000002.jsonl ...     the next file's first record chains to the last of this one
      anchor.json                0600, {file, seq, hash[, mac]}: the last record known synced
      audit-000002.jsonl.<offset>.torn   bytes of an unfinished write, moved aside on open
      .lock                      held (flock) by the one process that writes the log
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from llmos.audit.chain import BadLine, canonical, parse_line, record_mac

_NAME = re.compile(r"audit-(\d{6,})\.jsonl\Z")
ANCHOR = "anchor.json"


def file_name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def file_index(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def log_files(directory: Path) -> list[Path]:
    """The log's files, oldest first (by their number, not by name or time)."""
    if not directory.is_dir():
        return []
    found = [(file_index(p.name), p) for p in directory.iterdir()]
    return [p for i, p in sorted((i, p) for i, p in found if i is not None)]


def make_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)   # mkdir's mode is cut by the umask; an existing dir keeps its own


def open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def fsync_dir(directory: Path) -> None:
    """A created, renamed or removed name is durable only once its directory is synced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_anchor(path: Path, file: str, seq: int, digest: str, key: bytes | None) -> None:
    """Replace the anchor by rename, so a reader sees the old one or the new one, never half.
    No directory sync: a rename lost in a crash leaves the older anchor, which is still true."""
    anchor = {"file": file, "seq": seq, "hash": digest}
    if key is not None:
        anchor["mac"] = anchor_mac(key, seq, digest)
    tmp = path.with_name(path.name + ".tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, canonical(anchor) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def anchor_mac(key: bytes, seq: int, digest: str) -> str:
    return record_mac(key, hashlib.sha256(b"anchor:%d:" % seq + bytes.fromhex(digest)).hexdigest())


def last_record(path: Path) -> dict | None:
    """The last line of `path` as a record; None for an empty file. Reads backwards from the
    end, so opening a large log costs one small read. Call after cut_torn_tail."""
    with open(path, "rb") as f:
        pos, data = f.seek(0, os.SEEK_END), b""
        while pos > 0 and data.count(b"\n") < 2:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    if not data:
        return None
    return _parse(path, data[:-1].rsplit(b"\n", 1)[-1], "last")


def first_record(path: Path) -> dict | None:
    with open(path, "rb") as f:
        line = f.readline()
    return _parse(path, line[:-1], "first") if line.endswith(b"\n") else None


def _parse(path: Path, line: bytes, which: str) -> dict:
    try:
        return parse_line(line)
    except BadLine as exc:
        raise BadLine(f"{path.name}: {which} line: {exc}") from None


def cut_torn_tail(path: Path) -> tuple[int, bytes] | None:
    """Move the bytes after the last newline (an unfinished write) into `<file>.<offset>.torn`
    and truncate the file to that offset. Returns (offset, bytes), or None if the file ends
    cleanly. Safe to repeat after a crash half way: the same offset names the same torn file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos, tail = size, b""
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            if b"\n" in tail:
                break
    offset = pos + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
    if offset == size:
        return None
    with open(path, "rb") as f:
        f.seek(offset)
        torn = f.read()
    fd = open_private(path.with_name(f"{path.name}.{offset}.torn"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, torn)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset, torn
