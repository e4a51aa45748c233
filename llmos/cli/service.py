"""`llmos service install`: write llmosd's systemd unit (llmos/service/unit.py) and say
how to enable it. It runs systemctl only when asked (--enable)."""
from __future__ import annotations

import getpass
import os
import pwd
import subprocess
from pathlib import Path

import click

from llmos.paths import Paths
from llmos.service.unit import SYSTEM_DIR, UNIT_NAME, Unit, llmosd_command, user_unit_dir


@click.group()
def service():
    """Run llmosd as a systemd service."""


@service.command()
@click.option("--user", "user_mode", is_flag=True, help="a user unit (~/.config/systemd/user), no root needed")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="the service's state directory (default: llmos's --home, $LLMOS_HOME or ~/.llmos)")
@click.option("--run-as", default=None, help="system unit: the account llmosd runs as (default: you, or $SUDO_USER)")
@click.option("--unit-dir", type=click.Path(file_okay=False), default=None,
              help="write the unit here instead (default: /etc/systemd/system, or ~/.config/systemd/user with --user)")
@click.option("--dry-run", is_flag=True, help="print the unit and where it would go; write nothing")
@click.option("--enable", is_flag=True, help="then run systemctl daemon-reload and enable --now llmosd")
@click.pass_context
def install(ctx, user_mode, home, run_as, unit_dir, dry_run, enable):
    """Write the llmosd unit (Type=notify, hardened) for this installation's llmosd."""
    run_as = None if user_mode else (run_as or os.environ.get("SUDO_USER") or getpass.getuser())
    home_path = _service_home(ctx, home, run_as)
    cache = os.environ.get("LLMOS_MODEL_CACHE")
    unit = Unit(exec_start=llmosd_command(), home=home_path, user_mode=user_mode, run_as=run_as,
                model_cache=Path(cache).resolve() if cache else None)
    target = Path(unit_dir) if unit_dir else (user_unit_dir() if user_mode else SYSTEM_DIR)
    path = target / UNIT_NAME
    if dry_run:
        click.echo(f"# would write {path}")
        click.echo(unit.text(), nl=False)
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        path.write_text(unit.text())
        path.chmod(0o644)
        _make_home(home_path, run_as)
    except PermissionError as exc:
        raise click.ClickException(f"cannot write {exc.filename or path}: permission denied; run it with sudo, "
                                   f"or install a user unit with --user (or see it with --dry-run)") from None
    click.echo(f"{'replaced' if existed else 'wrote'} {path} (llmosd {unit.exec_start[0]}, home {home_path})")
    if run_as == "root":
        click.echo("warning: the service runs as root; give --run-as ACCOUNT to run it unprivileged", err=True)
    commands = _systemctl(user_mode)
    if enable:
        for argv in commands:
            click.echo("$ " + " ".join(argv))
            if subprocess.run(argv).returncode != 0:
                raise click.ClickException(f"{' '.join(argv)} failed")
        return
    click.echo("to start it now and at every boot:")
    for argv in commands:
        click.echo(("  sudo " if not user_mode else "  ") + " ".join(argv))
    if user_mode:
        click.echo(f"  loginctl enable-linger {getpass.getuser()}   # (so that it runs without a login session)")
    click.echo("then: systemctl " + ("--user " if user_mode else "") + "status llmosd; llmos logs -f")


def _service_home(ctx, home: str | None, run_as: str | None) -> Path:
    """--home, else llmos --home / $LLMOS_HOME, else the service account's ~/.llmos."""
    if home:
        return Paths.from_env(home).home
    parent = ctx.find_root().params.get("home")
    if parent or os.environ.get("LLMOS_HOME") or run_as is None:
        return Paths.from_env(parent).home
    try:
        return Path(pwd.getpwnam(run_as).pw_dir) / ".llmos"
    except KeyError:
        raise click.BadParameter(f"no account {run_as!r}", param_hint="--run-as") from None


def _make_home(home: Path, run_as: str | None) -> None:
    """ReadWritePaths= needs the home to exist when the service starts; owned by its account."""
    if home.exists():
        return
    home.mkdir(parents=True, mode=0o700)
    if run_as and os.geteuid() == 0:
        account = pwd.getpwnam(run_as)
        os.chown(home, account.pw_uid, account.pw_gid)


def _systemctl(user_mode: bool) -> list[list[str]]:
    base = ["systemctl", "--user"] if user_mode else ["systemctl"]
    return [[*base, "daemon-reload"], [*base, "enable", "--now", "llmosd"]]
