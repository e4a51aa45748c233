"""`llmos load NAME` / `llmos unload NAME`: bring a model into memory now, or send it away;
`llmos scale NAME N`: run N replicas of a loaded model.

A model also loads by itself when a request names it, and unloads when its keep-alive runs
out; these are for doing it ahead of time (warming before traffic) or at once (freeing memory).
"""
from __future__ import annotations

import time

import click

from llmos.client import Client
from llmos.paths import Paths

POLL_S = 0.2


def _state(c: Client, name: str) -> str | None:
    return next((m.get("state") for m in c.models() if m["id"] == name), None)


@click.command()
@click.argument("name")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="seconds to wait for it to load")
@click.option("--no-wait", is_flag=True, help="start loading and return")
@click.pass_obj
def load(paths: Paths, name: str, timeout: float, no_wait: bool):
    """Load a model now (its drivers start; it stays for its keep-alive)."""
    with Client(paths.home, timeout=30) as c:
        c.load_model(name)
        if no_wait:
            click.echo(f"{name}: loading")
            return
        click.echo(f"{name}: loading ...", err=True)
        deadline = time.monotonic() + timeout
        while (state := _state(c, name)) == "loading" and time.monotonic() < deadline:
            time.sleep(POLL_S)
    if state != "loaded":
        raise click.ClickException(f"{name} is {state}" + (" (see `llmos ps` for the driver's last error)"
                                                            if state == "failed" else ""))
    click.echo(f"{name}: loaded")


@click.command()
@click.argument("name")
@click.pass_obj
def unload(paths: Paths, name: str):
    """Unload an idle model now: its drivers stop and its memory is released."""
    with Client(paths.home, timeout=30) as c:
        c.unload_model(name)
    click.echo(f"{name}: unloaded")


@click.command()
@click.argument("name")
@click.argument("replicas", type=int)
@click.pass_obj
def scale(paths: Paths, name: str, replicas: int):
    """Run REPLICAS model drivers for a loaded model (balanced, cache-aware); fewer finish first."""
    with Client(paths.home, timeout=30) as c:
        data = c.scale_model(name, replicas)
    click.echo(f"{name}: {data['replicas']} replica(s): {', '.join(data['engines'])}")
