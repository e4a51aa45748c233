"""Where a key of a TOML file is set: its line, for errors tomllib cannot know about (an
unknown key, a value of the wrong type or range). tomllib gives values, not positions."""
from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+)(?:\s*\.\s*(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*=""")
_PART = re.compile(r"""(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_\-]+))""")


def _dotted(text: str) -> tuple[str, ...]:
    return tuple(m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None else m.group(3)
                 for m in _PART.finditer(text))


def line_of(text: str, where: tuple[str, ...], nth: int = 0) -> int | None:
    """The line (from 1) where the key path `where` is set, e.g. ("tenants", "alice",
    "weight"), or where its table begins; for an array of tables, in its nth table. A small
    scan of headers and `key =` lines, not a parser: a key it cannot place (inside a
    multi-line string or an inline table) gives None, or the line of the nearest table."""
    table: tuple[str, ...] = ()
    arrays: dict[tuple, int] = {}
    best = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = _dotted(header.group(2))
            if header.group(1) == "[[":
                arrays[table] = arrays.get(table, -1) + 1
                if arrays[table] != nth:
                    table = ("[skip]",)
            if table == where:
                return number
            if where[:len(table)] == table and table:
                best = number
            continue
        key = _KEY.match(line)
        if key:
            path = table + _dotted(key.group(1))
            if path == where or where[:len(path)] == path:
                return number
    return best
