"""Reading the log for people (`llmos audit tail`, `show`): records in order, the last n,
and following new ones across rotations. These trust what they read; `verify` is the check."""
from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from llmos.audit.files import file_index, log_files


def _records(path: Path, offset: int = 0) -> Iterator[tuple[int, dict]]:
    """(offset after the line, record) for each complete line from `offset`; lines that do
    not parse are skipped (verify names them), an unterminated tail is left for later."""
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield offset, rec


def read_records(directory: str | Path) -> Iterator[dict]:
    """Every record, oldest first."""
    for path in log_files(Path(directory)):
        for _, rec in _records(path):
            yield rec


def tail(directory: str | Path, n: int) -> list[dict]:
    """The last n records, oldest first; reads only as many files (newest first) as needed."""
    out: deque = deque()
    for path in reversed(log_files(Path(directory))):
        if len(out) >= n:
            break
        recs = [rec for _, rec in _records(path)]
        out.extendleft(reversed(recs[-(n - len(out)):]))
    return list(out)


def follow(directory: str | Path, sleep: Callable[[float], None] = time.sleep,
           poll: float = 0.5) -> Iterator[dict]:
    """Records appended from now on, forever (the caller stops it). When the writer rotates,
    the rest of the old file is read before moving to the next one."""
    directory = Path(directory)
    paths = log_files(directory)
    path = paths[-1] if paths else None
    offset = path.stat().st_size if path else 0
    while True:
        # Listed before reading: once a newer file exists the writer has finished this one,
        # so what is read next is all of it.
        newer = [p for p in log_files(directory) if path is None or file_index(p.name) > file_index(path.name)]
        if path is not None:
            for offset, rec in _records(path, offset):
                yield rec
        if newer:
            path, offset = newer[0], 0
            continue
        sleep(poll)
