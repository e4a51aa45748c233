"""`llmos models`: the model registry ($LLMOS_HOME/registry.db), with each model's state in
the running daemon. The registry works without a daemon; only the state needs one."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llmos.cli.format import print_table
from llmos.client import Client, DaemonNotRunning
from llmos.models.catalog import Catalog, Entry, ModelError
from llmos.models.facts import context_length, dir_size, read_config
from llmos.paths import Paths

UNLOADED = "unloaded"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ModelError as exc:   # a bad name, path, conversion...: one line, no traceback
            raise click.ClickException(str(exc)) from None
        except sqlite3.Error as exc:   # locked past the timeout, a full disk, a damaged file
            raise click.ClickException(f"model registry: {exc}") from None


@click.group(cls=_Group, invoke_without_command=True)
@click.pass_context
def models(ctx):
    """Registered models and their state (the same as `llmos models list`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_models)


def _served(paths: Paths) -> dict[str, dict] | None:
    """What the running daemon serves, by name; None when no daemon runs."""
    try:
        with Client(paths.home, timeout=10) as c:
            return {m["id"]: m for m in c.models()}
    except DaemonNotRunning:
        return None


def _state(name: str, served: dict | None) -> str:
    # The daemon may say loading/failed; a model it lists without a state is loaded.
    return (served[name].get("state") or "loaded") if served and name in served else UNLOADED


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _context(prepared: Path) -> int | None:
    try:
        return context_length(read_config(prepared))
    except ValueError:
        return None


@models.command("list")
@click.pass_obj
def list_models(paths: Paths):
    """Every registered model (and any other the daemon serves), with its state."""
    served = _served(paths)
    rows = []
    for e in Catalog(paths).list():
        prepared = Path(e.current.prepared)
        there = (prepared / "config.json").is_file()
        daemon_ctx = (served or {}).get(e.name, {}).get("max_model_len")
        rows.append([e.name, f"v{e.active}", e.current.kind, _size(dir_size(prepared)) if there else "-",
                     daemon_ctx or (_context(prepared) if there else None), _state(e.name, served)])
    known = {r[0] for r in rows}
    for name, m in (served or {}).items():   # served from a path spec, not registered
        if name not in known:
            rows.append([name, "-", "-", "-", m.get("max_model_len"), _state(name, served)])
    print_table(["NAME", "VERSION", "FORMAT", "SIZE", "CONTEXT", "STATE"], rows)


@models.command()
@click.argument("name")
@click.pass_obj
def show(paths: Paths, name: str):
    """Architecture, parameters, dtype, context, size, versions, history and state of NAME."""
    catalog = Catalog(paths)
    e = catalog.get(name)
    try:
        facts = catalog.facts(name)
    except ValueError:   # the built-in before its first use, or a source that is gone
        facts = None
    served = _served(paths)
    lines = [("name", e.name + (" (built in)" if e.builtin else "")), ("state", _state(name, served))]
    if facts is None:
        lines.append(("weights", f"not prepared yet ({e.current.prepared})"))
    else:
        arch = facts.architecture or "-"
        params = f"{facts.parameters / 1e6:.1f}M ({facts.parameters:,})" if facts.parameters else "-"
        lines += [("architecture", arch + (f" ({facts.model_type})" if facts.model_type else "")),
                  ("parameters", params), ("dtype", facts.dtype or "-"),
                  ("context length", facts.context_length or "-"),
                  ("size on disk", f"{_size(facts.size_bytes)} ({e.current.prepared})")]
    lines += [("keep alive", "daemon default" if e.keep_alive_s is None else f"{e.keep_alive_s:g} s"),
              ("replicas", e.replicas)]
    for key, value in lines:
        click.echo(f"{key + ':':16}{value}")
    click.echo()
    print_table(["VERSION", "ACTIVE", "FORMAT", "ADDED", "SOURCE", "NOTE"],
                [[f"v{v.number}", "*" if v.number == e.active else "", v.kind, _when(v.added_at), v.source,
                  v.note] for v in e.versions])
    events = catalog.history(name)
    if events:
        click.echo()
        print_table(["WHEN", "EVENT", "VERSION", "REASON"],
                    [[_when(ev.at), ev.kind, f"v{ev.version}" if ev.version else "-", ev.reason] for ev in events])


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class _Bar:
    """Progress on stderr, a line per stage, from the first report on (an HF directory gets none).
    Only on a terminal: in a pipe or a log a bar is noise, and the outcome is printed anyway."""

    def __init__(self):
        self.progress: Progress | None = None
        self.stage, self.task = None, None
        self.console = Console(stderr=True)

    def __call__(self, stage: str, done: int | None, total: int | None) -> None:
        if not self.console.is_terminal:
            return
        if self.progress is None:
            self.progress = Progress(SpinnerColumn(), TextColumn("converting: {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=self.console)
            self.progress.start()
        if stage != self.stage:
            self._finish()
            self.stage, self.task = stage, self.progress.add_task(stage, total=total)
        self.progress.update(self.task, completed=done or 0, total=total)

    def _finish(self) -> None:
        if self.task is not None:   # a stage without a count shows as done once the next begins
            t = self.progress.tasks[self.task]
            self.progress.update(self.task, total=t.total or 1, completed=t.total or 1)
            self.progress.stop_task(self.task)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            if exc[0] is None:
                self._finish()
            else:   # the error says what happened; a half-drawn bar would only get in its way
                self.progress.live.transient = True
            self.progress.stop()


@models.command()
@click.argument("name")
@click.argument("path", type=click.Path())
@click.option("--note", default="", help="why this model was added (kept in its history)")
@click.pass_obj
def add(paths: Paths, name: str, path: str, note: str):
    """Register PATH as NAME: a Hugging Face directory (used in place) or a .gguf file
    (converted once, now, into the model cache)."""
    with _Bar() as bar:
        e = Catalog(paths).add(name, path, note=note, progress=bar)
    click.echo(f"added {e.name} v{e.active} ({e.current.kind} from {e.current.source})")


@models.command()
@click.argument("src")
@click.argument("dst")
@click.pass_obj
def cp(paths: Paths, src: str, dst: str):
    """Register DST as a new name for the weights of SRC's active version (nothing is copied)."""
    catalog = Catalog(paths)
    version = catalog.get(src).active
    with _Bar() as bar:
        catalog.copy(src, dst, progress=bar)
    click.echo(f"copied {src} v{version} to {dst}")


@models.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="remove it even while the running daemon serves it")
@click.pass_obj
def rm(paths: Paths, name: str, force: bool):
    """Forget NAME and free its converted copy (the built-in smollm2 stays)."""
    catalog = Catalog(paths)
    entry: Entry = catalog.get(name)
    if not entry.builtin and not force and name in (_served(paths) or {}):
        raise click.ClickException(f"llmosd is serving {name!r}; stop it first, or pass --force")
    freed = catalog.remove(name)
    click.echo(f"removed {name}" + (f"; freed {', '.join(map(str, freed))}" if freed else ""))
