"""`llmos keys rotate-storage`: re-seal the job store with a new storage key.

With a daemon running, the daemon does it (POST /llmos/v1/storage/rotate) while it goes on
serving, and this command follows its progress; without one, it is done here, on the
store directly. The new key goes first in $LLMOS_HOME/storage.key, the old one stays until
every value is re-sealed, then it is removed. A key from $LLMOS_STORAGE_KEY or a systemd
credential cannot be changed by llmos: put the new key first there (NEW,OLD), restart,
and run this to re-seal everything with it.
"""
from __future__ import annotations

import time

import click

from llmos.client import Client, DaemonNotRunning, LlmosError
from llmos.paths import Paths


def _report(status: dict) -> None:
    """What the pass did; exit code 1 if some values opened with no key (they are left)."""
    if status["unreadable"]:
        click.echo(f"{status['resealed']} values re-sealed with key {status['key_id']}; {status['unreadable']} "
                   "could not be opened with any key (altered, or sealed with a key not given) and were left")
    else:
        click.echo(f"every value is sealed with key {status['key_id']} ({status['resealed']} re-sealed)")
    if status["dropped_key_ids"] and status["source"] == "file":
        click.echo(f"old key(s) removed: {', '.join(status['dropped_key_ids'])}")
    if status.get("note"):
        click.echo(status["note"])
    if status["unreadable"]:
        raise click.exceptions.Exit(1)


def _offline(paths: Paths) -> dict:
    from llmos.kernel.jobs.rotation import rotate_offline
    from llmos.kernel.jobs.sealing import StorageKeyError
    from llmos.kernel.jobs.store import JobStore
    if not paths.jobs_db.exists():
        raise click.ClickException(f"no job store at {paths.jobs_db}")
    try:
        store = JobStore(paths.jobs_db)
        try:
            return rotate_offline(store)
        finally:
            store.close()
    except StorageKeyError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("rotate-storage")
@click.option("--no-wait", is_flag=True, help="start the rotation and return (the daemon finishes it)")
@click.pass_obj
def rotate_storage(paths: Paths, no_wait):
    """Re-encrypt the job store with a new storage key, without downtime."""
    try:
        with Client(paths.home, timeout=30) as c:
            status = c.rotate_storage()
            click.echo(f"re-sealing with key {status['key_id']} (daemon)", err=True)
            while status["rotating"] and not no_wait:
                time.sleep(0.5)
                status = c.storage_status()
    except DaemonNotRunning:
        click.echo("llmosd is not running: re-sealing here", err=True)
        status = _offline(paths)
    except LlmosError as exc:
        raise click.ClickException(f"{exc.status or 'error'} {exc.code or ''}: {exc.message}") from None
    if status["rotating"]:
        click.echo(f"the daemon goes on re-sealing ({status['resealed']} values so far)")
    else:
        _report(status)
