"""`llmos logs [PROCESS] [-f] [-n N] [--json]`: read $LLMOS_HOME/logs/<process>.log and its
rotated copies (<process>.log.1 is the newest of those), oldest line first.

Lines are JSON (llmos/logging_setup.py); they are printed readable, in local time, with their
extra fields as key=value, or raw with --json. `-f` follows the file across rotation, as
`tail -F` does. Works without a running daemon: it only reads files.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from llmos.logging_setup import STDERR_SUFFIX
from llmos.paths import Paths

FOLLOW_POLL_S = 0.25
_SHOWN = ("time", "level", "process", "pid", "logger", "msg", "exc")


def chain(logs_dir: Path, name: str) -> list[Path]:
    """The files of one log, oldest first: name.log.K ... name.log.1, name.log."""
    current = logs_dir / f"{name}.log"
    rotated = sorted((p for p in logs_dir.glob(f"{name}.log.*") if p.suffix[1:].isdigit()),
                     key=lambda p: int(p.suffix[1:]), reverse=True)
    return rotated + ([current] if current.exists() else [])


def names(logs_dir: Path) -> list[str]:
    """The processes that have a log: kernel, io, model-<m>, tokenizer-<m>, ..."""
    found = {p.name[: -len(".log")] for p in logs_dir.glob("*.log") if not p.name.endswith(STDERR_SUFFIX)}
    return sorted(found, key=lambda n: (n != "kernel", n))


def last_lines(files: list[Path], n: int) -> list[str]:
    """The last `n` lines over `files` (oldest first); n < 0: all of them."""
    out: list[str] = []
    for f in reversed(files):
        try:
            out = f.read_text(encoding="utf-8", errors="replace").splitlines() + out
        except FileNotFoundError:   # rotated away while we read: its lines are in the next one
            continue
        if 0 <= n <= len(out):
            break
    return out if n < 0 else out[len(out) - n:] if n else []


def readable(line: str) -> str:
    """One JSON line as text: time level process logger: msg [key=value ...], the traceback below."""
    try:
        rec = json.loads(line)
    except ValueError:
        return line
    if not isinstance(rec, dict):
        return line
    try:
        when = datetime.fromisoformat(str(rec.get("time", "")).replace("Z", "+00:00")).astimezone()
        stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except ValueError:
        stamp = str(rec.get("time", "?"))
    extras = " ".join(f"{k}={v}" for k, v in rec.items() if k not in _SHOWN and v is not None)
    text = f"{stamp} {rec.get('level', '?'):<7} {rec.get('process', '?')} {rec.get('logger', '?')}: {rec.get('msg', '')}"
    text += f"  [{extras}]" if extras else ""
    if rec.get("exc"):
        text += "\n" + "\n".join("    " + x for x in str(rec["exc"]).splitlines())
    return text


def follow(path: Path, show, poll_s: float = FOLLOW_POLL_S, stop=lambda: False, at_end: bool = True) -> None:
    """Call `show(line)` for each line appended to `path` (from its end, or its start); when it
    is rotated (another file now has its name) or truncated, finish the old one, then read the
    new one from its start. A reader more than one rotation behind misses a file, as tail -F would."""
    fh, _ = _open(path, at_end=at_end)
    pending = ""
    while not stop():
        if fh is not None:
            chunk = fh.read()
            if chunk:
                pending += chunk
                *complete, pending = pending.split("\n")
                for line in complete:
                    show(line)
                continue
            if _replaced(path, fh):
                fh.close()
                fh, _ = _open(path, at_end=False)
                continue
        else:
            fh, _ = _open(path, at_end=False)
        time.sleep(poll_s)
    if fh is not None:
        fh.close()


def _open(path: Path, at_end: bool):
    try:
        fh = open(path, encoding="utf-8", errors="replace", newline="\n")
    except FileNotFoundError:
        return None, 0
    if at_end:
        fh.seek(0, os.SEEK_END)
    return fh, fh.tell()


def _replaced(path: Path, fh) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False   # between the rename and the new file: wait for it
    mine = os.fstat(fh.fileno())
    return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino) or now.st_size < fh.tell()


@click.command()
@click.argument("process", default="kernel")
@click.option("-f", "--follow", "keep_following", is_flag=True, help="keep printing new lines (Ctrl-C stops)")
@click.option("-n", "--lines", "count", type=int, default=50, show_default=True, help="last lines to print (-1: all)")
@click.option("--json", "raw", is_flag=True, help="the JSON lines as they are")
@click.option("--stderr", "stderr_file", is_flag=True,
              help="the process's raw stderr instead (crash tracebacks, output from before its logging started)")
@click.pass_obj
def logs(paths: Paths, process, keep_following, count, raw, stderr_file):
    """Print the log of PROCESS: kernel (default), io, model-<name>, tokenizer-<name>."""
    logs_dir = paths.logs_dir
    files = [p for p in [logs_dir / f"{process}{STDERR_SUFFIX}.1", logs_dir / f"{process}{STDERR_SUFFIX}"]
             if p.exists()] if stderr_file else chain(logs_dir, process)
    if not files and not keep_following:
        known = ", ".join(names(logs_dir)) if logs_dir.is_dir() else ""
        raise click.ClickException(
            f"no log for {process!r} in {logs_dir}" + (f"; logs there: {known}" if known else "") +
            " (a daemon run with LLMOS_LOG_TARGET=journal logs to the journal: journalctl -u llmosd -o cat)")
    def show(line: str) -> None:
        click.echo(line if raw or stderr_file else readable(line))
        if keep_following:
            sys.stdout.flush()
    for line in last_lines(files, count):
        show(line)
    if keep_following:
        try:
            follow(files[-1] if files else logs_dir / f"{process}.log", show)
        except KeyboardInterrupt:
            pass
