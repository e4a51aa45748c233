"""Output helpers shared by the `llmos` commands: durations, and tables drawn with rich.

On a terminal a table is styled and as wide as the terminal. Anywhere else (a pipe, a file,
click's CliRunner) it is plain text at a width no table reaches, so nothing is wrapped or
cut whatever the terminal (or $COLUMNS) says, and lines carry no trailing blanks.
"""
from __future__ import annotations

from typing import Iterable

import click
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

PLAIN_WIDTH = 10_000   # the width of plain-text output: wider than any table


def dur(seconds) -> str:
    """A duration for people: 4.2s, 3m07s, 2h05m; "-" for no number."""
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def table(headers: list[str], rows: Iterable[Iterable] = (), title: str | None = None) -> Table:
    """Columns two spaces apart, no borders, never wrapped; None shows as "-"."""
    t = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False, expand=False)
    for h in headers:
        t.add_column(h, no_wrap=True)
    for row in rows:
        add_row(t, row)
    return t


def add_row(t: Table, cells: Iterable, style: str | None = None) -> None:
    """Cells are text, not rich markup: "[#####  ]" or an error message shows as it is."""
    t.add_row(*(Text("-" if v is None else str(v)) for v in cells), style=style)


def console() -> Console:
    """The console for a command's output on stdout (see the module docstring)."""
    c = Console(highlight=False)
    return c if c.is_terminal else Console(highlight=False, color_system=None, width=PLAIN_WIDTH)


def show(renderable: RenderableType, out: Console | None = None) -> None:
    """Print a table (or a group of them) to stdout."""
    out = out or console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def print_table(headers: list[str], rows: Iterable[Iterable]) -> None:
    show(table(headers, rows))
