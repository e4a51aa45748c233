"""`llmos keys create | list | revoke`: API keys for the socket's other users and the TCP listener.

Keys live hashed in $LLMOS_HOME/keys.db (kernel/auth.py); the secret is printed once, at
creation, and never again. The daemon sees a new or revoked key within a second.
"""
from __future__ import annotations

import datetime
import os

import click

from llmos import names
from llmos.cli.format import print_table
from llmos.client import Client, DaemonNotRunning, LlmosError
from llmos.keep_alive import parse_keep_alive
from llmos.kernel.auth import KeyStore
from llmos.paths import Paths


def _store(paths: Paths) -> KeyStore:
    paths.home.mkdir(parents=True, exist_ok=True)
    return KeyStore(paths.home / "keys.db")


def _audit(paths: Paths, action: str, row) -> None:
    """Key changes are audit records: through the running daemon (it holds the log), else here."""
    fields = {"action": action, "id": row.id, "tenant": row.tenant}
    try:
        with Client(paths.home, timeout=10) as c:
            c.key_changed(action, row.id, row.tenant)
        return
    except DaemonNotRunning:
        pass
    except LlmosError as exc:   # the key changed all the same: say that the record is missing
        click.echo(f"warning: the daemon did not record this in its audit log: {exc}", err=True)
        return
    from llmos.audit import AuditError, AuditLog, audit_dir, key_file_setting, load_key
    try:
        kp = key_file_setting(None)
        with AuditLog(audit_dir(paths.home), hmac_key=load_key(kp) if kp else None) as log:
            log.record("key.change", principal=f"uid:{os.getuid()}", status="ok", **fields)
    except (AuditError, OSError, ValueError) as exc:
        click.echo(f"warning: the audit log could not record this: {exc}", err=True)


def _when(t) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


@click.group()
def keys():
    """API keys: who may use the daemon, as which tenant, with which models and priority."""


@keys.command()
@click.option("--tenant", required=True, help="the tenant every request of this key runs as")
@click.option("--models", default=None, help="comma-separated models it may use (default: all)")
@click.option("--max-priority", type=click.Choice(names.PRIORITY_CLASSES), default="interactive",
              show_default=True, help="the best priority class it may ask for")
@click.option("--admin", is_flag=True, help="it may use the admin API (restart, models, keys, others' requests)")
@click.option("--expires", default=None, help="lifetime, e.g. 30d, 12h (default: never)")
@click.option("--note", default="", help="what it is for")
@click.pass_obj
def create(paths: Paths, tenant, models, max_priority, admin, expires, note):
    """Make a key; its secret is printed once."""
    try:
        lifetime = parse_keep_alive(expires) if expires else None
    except ValueError as exc:
        raise click.BadParameter(str(exc).replace("keep_alive", "expires"), param_hint="--expires") from None
    if lifetime is not None and lifetime <= 0:
        raise click.BadParameter("give a positive lifetime such as 30d", param_hint="--expires")
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        secret, row = _store(paths).create(tenant, allowed, max_priority, admin, lifetime, note)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)
    click.echo(f"key {row.id} for tenant {row.tenant}: keep the secret above; it is not shown again", err=True)
    _audit(paths, "create", row)


@keys.command("list")
@click.pass_obj
def list_keys(paths: Paths):
    """Every key, without secrets."""
    print_table(["ID", "TENANT", "MODELS", "MAX_PRIORITY", "ADMIN", "CREATED", "EXPIRES", "REVOKED", "NOTE"],
                [[r.id, r.tenant, ",".join(r.models) if r.models else "*", r.max_priority, "yes" if r.admin else "",
                  _when(r.created_at), _when(r.expires_at), _when(r.revoked_at), r.note] for r in _store(paths).rows()])


@keys.command()
@click.argument("key_id")
@click.pass_obj
def revoke(paths: Paths, key_id: str):
    """Revoke a key (within a second the daemon refuses it)."""
    store = _store(paths)
    try:
        store.revoke(key_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    click.echo(f"revoked {key_id}")
    _audit(paths, "revoke", store.get(key_id))
