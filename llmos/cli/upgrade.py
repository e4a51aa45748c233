"""`llmos models upgrade NAME --to PATH`, `llmos models rollback NAME`, `llmos models history NAME`.

The new version is added to the registry here (a GGUF converts on this side, with its progress
bar), then the daemon tries it: loads it next to the old one, runs the canary, switches, and
rolls back by itself if it fails (llmos/kernel/upgrades.py). Without a running daemon the
version simply becomes the active one.
"""
from __future__ import annotations

import datetime
import time

import click

from llmos.cli.format import print_table
from llmos.cli.models import _Bar, models
from llmos.client import Client, DaemonNotRunning
from llmos.models.catalog import Catalog
from llmos.paths import Paths

POLL_S = 0.25


def _follow(c: Client, name: str, timeout: float) -> dict:
    """Wait until the upgrade switched or rolled back; returns the last status."""
    deadline, shown = time.monotonic() + timeout, None
    while True:
        status = c.upgrade_status(name)
        u = status["upgrade"]
        phase = u["phase"] if u else None
        if phase != shown and phase is not None:
            click.echo(f"{name}: {phase} v{u['to']}" + (f" ({', '.join(u['engines'])})" if phase == "loading" else ""),
                       err=True)
            shown = phase
        if u is None or phase == "watching" or time.monotonic() > deadline:
            return status
        time.sleep(POLL_S)


@click.command()
@click.argument("name")
@click.option("--to", "path", required=True, help="the new version: an HF directory or a .gguf file")
@click.option("--note", default="", help="recorded with the version")
@click.option("--in-place", is_flag=True, help="when both versions do not fit: new requests wait while the old "
                                               "version drains, then the new one loads in its memory")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="seconds to wait for the switch")
@click.pass_obj
def upgrade(paths: Paths, name: str, path: str, note: str, in_place: bool, timeout: float):
    """Upgrade NAME without interrupting it: load, canary, switch; automatic rollback."""
    catalog = Catalog(paths)
    with _Bar() as bar:
        version = catalog.add_version(name, path, note=note, activate=False, progress=bar)
    click.echo(f"{name}: v{version} added")
    try:
        with Client(paths.home, timeout=30) as c:
            c.upgrade_model(name, version, in_place=in_place)
            status = _follow(c, name, timeout)
    except DaemonNotRunning:
        catalog.set_active(name, version, note or "upgrade (no daemon running)")
        click.echo(f"{name}: v{version} is active (no daemon runs; it loads next time)")
        return
    u, last = status["upgrade"], status.get("last") or {}
    if u is not None and u["phase"] == "watching":
        click.echo(f"{name}: switched to v{version} after {u['switched_at_s']} s; the old version finishes what "
                   f"it holds and retires once v{version} has served its first requests")
    elif last.get("to") == version and last.get("outcome") == "switched":
        click.echo(f"{name}: switched to v{version}")
    elif last.get("to") == version:
        raise click.ClickException(f"{name}: v{version} rolled back: {last.get('reason')}")
    else:
        raise click.ClickException(f"{name}: the upgrade to v{version} did not finish within {timeout:g} s")


@click.command()
@click.argument("name")
@click.pass_obj
def rollback(paths: Paths, name: str):
    """Abandon an upgrade in progress, or go back to the version before the last one."""
    with Client(paths.home, timeout=30) as c:
        data = c.rollback_model(name)
    if data.get("phase") == "rolled back":
        click.echo(f"{name}: upgrade abandoned; serving v{data.get('serving')}")
    else:
        click.echo(f"{name}: rolling back to v{data.get('to')} (`llmos models history {name}` shows how it went)")


@click.command()
@click.argument("name")
@click.pass_obj
def history(paths: Paths, name: str):
    """Every version change of NAME: added, upgraded, rolled back, failed upgrades, with reasons."""
    rows = [[datetime.datetime.fromtimestamp(e.at).strftime("%Y-%m-%d %H:%M:%S"), e.kind,
             "-" if e.version is None else f"v{e.version}", e.reason] for e in Catalog(paths).history(name)]
    print_table(["WHEN", "EVENT", "VERSION", "REASON"], rows)


models.add_command(upgrade)     # llmos models upgrade | rollback | history
models.add_command(rollback)
models.add_command(history)
