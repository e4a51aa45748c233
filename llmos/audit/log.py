"""AuditLog: the one writer of an audit directory (see files.py for the layout).

Durability. record() appends its line with one write(2) before it returns, under a lock,
so lines never interleave and a crash of the process loses nothing record() returned.
fsync is batched: a background thread syncs at most every `sync_interval` (0.1 s) while
records arrive, then rewrites the anchor. So the caller (the kernel's event loop, a record
per request at hundreds a second) pays a page-cache write of a few hundred bytes, never a
disk flush, and a crash of the machine loses at most the last sync_interval of records:
whole records at the end, never one in the middle. A torn last line (power lost during a
write) is moved aside on the next open and the log says so (`audit.recovered`).
Rotation fsyncs the old file inline: one flush per max_bytes, rare by construction.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from llmos.audit import files as F
from llmos.audit.chain import GENESIS, RESERVED, AuditError, BadLine, record_mac, seal
from llmos.audit.events import request_fields

log = logging.getLogger("llmos.audit")

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_KEEP_FILES = 32          # 2 GiB at the default size; pruning is itself recorded


class AuditLog:
    """Append-only, hash-chained records in `directory` (created 0700).

    May be called from any thread. The directory is flock'ed: a second writer (another
    daemon on the same home) is refused with AuditError instead of forking the chain.
    record() raises ValueError for fields that are not JSON or reuse a reserved name, and
    AuditError when the log cannot be written (the chain is then left as it was)."""

    def __init__(self, directory: str | os.PathLike, hmac_key: bytes | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, keep_files: int | None = DEFAULT_KEEP_FILES,
                 sync_interval: float = 0.1, record_prompts: bool = False):
        if keep_files is not None and keep_files < 1:
            raise ValueError("keep_files must be at least 1 (or None: keep every file)")
        self.directory = Path(directory)
        self.key = hmac_key
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.sync_interval = sync_interval
        self.record_prompts = record_prompts
        self.seal = None   # set to the job store's Keyring.seal: then kept prompts are encrypted
        self.anchor_path = self.directory / F.ANCHOR
        self._lock = threading.Lock()          # the chain state and the file
        self._sync_lock = threading.Lock()     # one fsync + anchor rewrite at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failed: str | None = None
        self._closed = False
        F.make_private_dir(self.directory)
        self._lock_fd = F.open_private(self.directory / ".lock", os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise AuditError(f"another process is writing the audit log in {self.directory}") from None
        try:
            self._open_newest()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._syncer = threading.Thread(target=self._sync_loop, name="audit-sync", daemon=True)
        self._syncer.start()

    # ------------------------------------------------------------------ the API

    def record(self, kind: str, **fields) -> dict:
        """Append one record and return it as written (seq, ts, kind, fields, prev, hash[, mac])."""
        if not isinstance(kind, str) or not kind:
            raise ValueError("an audit record needs a kind")
        reused = sorted(set(fields) & set(RESERVED))
        if reused:
            raise ValueError(f"audit fields may not be named {', '.join(reused)}")
        with self._lock:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._failed:
                raise AuditError(f"the audit log failed earlier: {self._failed}")
            rec = self._append(kind, fields)
        self._wake.set()
        return rec

    def request(self, **fields) -> dict:
        """The per-request record (events.request_fields); the prompt only if record_prompts."""
        return self.record("request", **request_fields(record_prompts=self.record_prompts, seal=self.seal, **fields))

    def sync(self) -> None:
        """Make every record appended so far durable, then point the anchor at the last one."""
        with self._sync_lock:
            with self._lock:
                if not self._dirty or self._fd is None:
                    return
                fd, file, seq, digest = os.dup(self._fd), self._file, self._seq, self._prev
                self._dirty = False
            try:
                os.fsync(fd)   # outside the lock: records go on being appended meanwhile
            finally:
                os.close(fd)
            F.write_anchor(self.anchor_path, file, seq, digest, self.key)

    def close(self) -> None:
        """Sync, stop the thread, release the directory. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        self._syncer.join()
        try:
            if not self._failed:
                self.sync()
        finally:
            with self._lock:
                self._closed = True
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def failed(self) -> str | None:
        """Why the log stopped taking records (a failed fsync or rotation), or None: for /health."""
        return self._failed

    @property
    def last(self) -> tuple[str, int, str]:
        """(file, seq, hash) of the last record appended."""
        with self._lock:
            return self._file, self._seq, self._prev

    # ------------------------------------------------------------------ inside

    def _open_newest(self) -> None:
        paths = F.log_files(self.directory)
        if not paths:
            self._seq, self._prev = 0, GENESIS
            self._start_file(1)
            return
        newest = paths[-1]
        cut = F.cut_torn_tail(newest)
        last = None
        try:
            for path in reversed(paths):   # the newest file may be empty (a crash right after rotating)
                last = F.last_record(path)
                if last is not None:
                    break
        except BadLine as exc:
            raise AuditError(f"audit log {self.directory}: {exc}; run `llmos audit verify`") from None
        if last is not None:
            self._check_key(last)
        self._seq, self._prev = (last["seq"], last["hash"]) if last else (0, GENESIS)
        self._index = F.file_index(newest.name)
        self._fd = F.open_private(newest, os.O_WRONLY | os.O_APPEND)
        self._file, self._size = newest.name, os.fstat(self._fd).st_size
        self._only_header = self._size == 0
        self._dirty = True   # the first sync writes an anchor even if nothing is recorded
        if self._size == 0:
            self._append("audit.file", {"file": self._file})
            self._only_header = True
        if cut is not None:
            offset, torn = cut
            self._append("audit.recovered", {
                "file": newest.name, "offset": offset, "bytes": len(torn),
                "sha256": hashlib.sha256(torn).hexdigest(), "torn_file": f"{newest.name}.{offset}.torn"})
            log.warning("audit log: %d torn bytes at the end of %s moved aside", len(torn), newest.name)

    def _check_key(self, last: dict) -> None:
        # A key applies to a whole log: mixing signed and unsigned records would make every
        # verify fail, so a changed key setting is refused here, where it is cheap to see.
        if self.key is None and "mac" in last:
            raise AuditError(f"audit log {self.directory} is signed; configure its HMAC key file")
        if self.key is not None and "mac" not in last:
            raise AuditError(f"audit log {self.directory} was written without an HMAC key; "
                             "move it aside to start a signed log")
        if self.key is not None and record_mac(self.key, last["hash"]) != last["mac"]:
            raise AuditError(f"audit log {self.directory} was signed with another HMAC key")

    def _start_file(self, index: int) -> None:
        self._index, self._file = index, F.file_name(index)
        self._fd = F.open_private(self.directory / self._file, os.O_WRONLY | os.O_APPEND)
        self._size = 0
        F.fsync_dir(self.directory)
        self._dirty = True
        self._only_header = True   # a file holding only its header never rotates
        self._append("audit.file", {"file": self._file})
        self._only_header = True

    def _append(self, kind: str, fields: dict) -> dict:
        """Caller holds the lock. The chain advances only once the whole line is written."""
        rec = self._build(kind, fields)
        line = seal(rec, self.key)
        if self._size + len(line) > self.max_bytes and not self._only_header:
            try:
                self._rotate()
            except OSError as exc:   # the old file may be closed already: nothing more goes in
                self._failed = f"rotation failed: {exc}"
                raise AuditError(f"audit log rotation failed: {exc}") from exc
            rec = self._build(kind, fields)
            line = seal(rec, self.key)
        self._write(line)
        self._seq, self._prev = rec["seq"], rec["hash"]
        self._only_header = False
        return rec

    def _build(self, kind: str, fields: dict) -> dict:
        return {"seq": self._seq + 1, "ts": round(time.time(), 6), "kind": kind, **fields, "prev": self._prev}

    def _write(self, line: bytes) -> None:
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            # A short write (a full disk) must not leave half a record for the next to follow.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as again:
                self._failed = f"write failed ({exc}) and could not be undone ({again})"
            raise AuditError(f"audit record not written: {exc}") from exc
        self._size += len(line)
        self._dirty = True

    def _rotate(self) -> None:
        # The old file is complete and durable before the next file names its last hash.
        os.fsync(self._fd)
        os.close(self._fd)
        self._start_file(self._index + 1)
        self._prune()

    def _prune(self) -> None:
        paths = F.log_files(self.directory)
        if self.keep_files is None or len(paths) <= self.keep_files:
            return
        doomed, kept = paths[: -self.keep_files], paths[-self.keep_files]
        first = F.first_record(kept)
        # Recorded (and synced) before the files go: verify then knows where the log may start.
        self._append("audit.pruned", {"files": [p.name for p in doomed], "kept_from": kept.name,
                                      "kept_seq": first["seq"], "kept_prev": first["prev"]})
        os.fsync(self._fd)
        try:
            for path in doomed:
                for torn in self.directory.glob(path.name + ".*.torn"):
                    torn.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            F.fsync_dir(self.directory)
        except OSError as exc:   # files left behind are still a valid log; the next rotation retries
            log.warning("audit log: pruning %s failed: %s", kept.name, exc)

    def _sync_loop(self) -> None:
        while not self._stop.is_set():   # close() makes the final sync itself
            self._wake.wait()
            if self._stop.wait(self.sync_interval):   # gather what arrives meanwhile into one fsync
                return
            self._wake.clear()                        # before sync(): a later record wakes us again
            try:
                self.sync()
            except Exception as exc:   # the loop must live; later records then fail loudly
                with self._lock:
                    self._failed = f"fsync failed: {exc}"
                log.error("audit log: fsync failed: %s", exc)
