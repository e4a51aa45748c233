"""Logging for every llmos process: one JSON object per line, one file per process.

The kernel calls `setup_logging("kernel", logs_dir)` and exports its choices in the
environment, so each driver's `setup_logging(name)` follows them:

- target `file` (the default): `$LLMOS_HOME/logs/<process>.log`, rotated by size
  (LLMOS_LOG_MAX_BYTES, default 10 MiB; LLMOS_LOG_BACKUPS, default 5 older files);
- target `journal` (LLMOS_LOG_TARGET=journal, for systemd): JSON on stderr, which journald keeps.

What bypasses logging (a traceback before logging is up, a C library's output) goes to the
process's stderr: for a driver, `logs/<name>.stderr.log` (the supervisor's); for the kernel,
wherever it was started (`llmos start`: `logs/kernel.stderr.log`, a terminal, the journal).
The kernel also echoes its lines there in the old readable form (LLMOS_LOG_ECHO: a level, or
"off"; WARNING by default when stderr is the journal).

A record's extras become fields: `log.info(..., extra={"request_id": ..., "tenant": ...,
"model": ...})`. Log no prompt or generated text.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_BACKUPS = 5
TEXT_FORMAT = "%(asctime)s {process} %(levelname)s %(name)s: %(message)s"
STDERR_SUFFIX = ".stderr.log"   # a process's raw stderr, beside its JSON log
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """time (UTC, ms), level, process (kernel or the driver's name), pid, logger, msg, then
    the record's extras, then exc (the traceback) if any. Values JSON cannot hold become str."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                       .replace("+00:00", "Z"),
               "level": record.levelname, "process": self.process, "pid": record.process,
               "logger": record.name, "msg": record.getMessage()}
        out.update((k, v) for k, v in vars(record).items()   # (a "_" name is a library's own, e.g. Ray's)
                   if k not in _STANDARD and k not in out and not k.startswith("_"))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exc"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def log_target() -> str:
    """'journal' or 'file' (LLMOS_LOG_TARGET; anything else counts as file)."""
    return "journal" if os.environ.get("LLMOS_LOG_TARGET", "file").lower() == "journal" else "file"


def stderr_is_journal() -> bool:
    """systemd's test (sd_journal_stream_fd): JOURNAL_STREAM names the device and inode of
    the stream it connected; a child whose stderr was redirected inherits the variable, not the stream."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return bool(ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def rotation() -> tuple[int, int]:
    """(max bytes of one file, older files kept) from the environment; bad values fall back."""
    def number(name: str, default: int, least: int) -> int:
        try:
            return max(least, int(os.environ.get(name, default)))
        except ValueError:
            return default
    return number("LLMOS_LOG_MAX_BYTES", DEFAULT_MAX_BYTES, 1024), number("LLMOS_LOG_BACKUPS", DEFAULT_BACKUPS, 1)


def setup_logging(process: str, logs_dir: Path | None = None, level: str | None = None) -> None:
    """Configure the root logger of this process. The kernel passes its `logs_dir`, and its
    choices are exported for its drivers; a driver passes none and reads LLMOS_LOG_DIR, which
    the supervisor sets (a driver run outside a daemon, as some tests do, logs JSON to stderr)."""
    level = (level or os.environ.get("LLMOS_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    target = log_target()
    folder = logs_dir if logs_dir is not None else os.environ.get("LLMOS_LOG_DIR")
    if target == "file" and folder:
        max_bytes, backups = rotation()
        Path(folder).mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(Path(folder) / f"{process}.log", maxBytes=max_bytes,
                                                       backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root.addHandler(handler)
    if logs_dir is not None:   # the kernel: echo, and hand the choices down to the drivers
        if target == "file":   # (journal: stderr has every line already)
            _echo(process, root)
        os.environ.update(LLMOS_LOG_TARGET=target, LLMOS_LOG_LEVEL=level)   # (the supervisor sets LLMOS_LOG_DIR)
    logging.captureWarnings(True)
    _log_uncaught()


def _echo(process: str, root: logging.Logger) -> None:
    wanted = os.environ.get("LLMOS_LOG_ECHO") or ("WARNING" if stderr_is_journal() else "NOTSET")
    if wanted.lower() in ("off", "0", "no", "false"):
        return
    echo = logging.StreamHandler(sys.stderr)
    echo.setLevel(wanted.upper() if isinstance(logging.getLevelName(wanted.upper()), int) else "NOTSET")
    echo.setFormatter(logging.Formatter(TEXT_FORMAT.format(process=process)))
    root.addHandler(echo)


def _log_uncaught() -> None:
    """An exception nobody caught is logged (as JSON, with its traceback) and still printed
    to stderr by the default hook: the crash is visible in both places."""
    def hook(kind, value, tb, default=sys.__excepthook__):
        if not issubclass(kind, KeyboardInterrupt):
            logging.getLogger("llmos").critical("uncaught exception", exc_info=(kind, value, tb))
        default(kind, value, tb)

    def thread_hook(args, default=threading.__excepthook__):
        if args.exc_type is not SystemExit:
            logging.getLogger("llmos").critical("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                                                exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        default(args)
    sys.excepthook, threading.excepthook = hook, thread_hook


def cap_file(path: Path, max_bytes: int | None = None) -> Path:
    """Before a process starts writing its raw stderr to `path` (append): a file past the
    size limit becomes `path.1` (the one older copy kept), so crash output stays bounded."""
    limit = rotation()[0] if max_bytes is None else max_bytes
    try:
        if path.stat().st_size > limit:
            os.replace(path, f"{path}.1")
    except FileNotFoundError:
        pass
    return path
