"""`llmos audit ...`: verify the audit log's chain and read it.

These read the files under $LLMOS_HOME/audit directly (no daemon needed: a log is checked
where it lies, or a copy of it with --dir). Exit status of `verify`: 0 intact, 1 not.
"""
from __future__ import annotations

import fnmatch
import json
import re
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import click

from llmos.audit import AuditError, audit_dir, generate_key, key_file_setting, load_key, read_records, tail, verify
from llmos.audit.files import log_files
from llmos.audit.read import follow
from llmos.paths import Paths

_sleep = time.sleep          # `tail -f` polls with this (tests replace it)
_HIDDEN = ("seq", "ts", "kind", "prev", "hash", "mac")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@click.group()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="the audit directory (default $LLMOS_HOME/audit)")
@click.pass_context
def audit(ctx, directory):
    """The tamper-evident audit log: verify it, tail it, show a period of it."""
    home = ctx.obj.home if isinstance(ctx.obj, Paths) else Paths.from_env().home
    ctx.obj = directory or audit_dir(home)


@audit.command("verify")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="the HMAC key file (default $LLMOS_AUDIT_KEY_FILE); checks every record's mac")
@click.option("--anchor", type=click.Path(dir_okay=False, path_type=Path),
              help="an anchor file kept elsewhere (default the log's own anchor.json)")
@click.option("--json", "as_json", is_flag=True, help="the result as JSON")
@click.pass_obj
def verify_cmd(directory: Path, key_file, anchor, as_json):
    """Check every record's hash, mac, order and chain; name the first bad one."""
    path = key_file_setting(key_file)
    try:
        key = load_key(path) if path else None
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    if not log_files(directory):
        raise click.ClickException(f"no audit log in {directory}")
    res = verify(directory, key, anchor)
    if as_json:
        click.echo(json.dumps(asdict(res), indent=2))
    elif res.ok:
        checks = ["macs checked" if res.macs_checked else "macs not checked",
                  "anchor reached" if res.anchored else "no anchor checked"]
        click.echo(f"ok: {res.records} records in {len(res.files)} files (seq {res.first_seq}..{res.last_seq}), "
                   f"last hash {res.last_hash}; {', '.join(checks)}")
    else:
        click.echo(f"BAD: {res.bad}")
    if not as_json:
        for note in res.notes:
            click.echo(f"note: {note}")
    if not res.ok:
        click.get_current_context().exit(1)


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(min=0), default=10, show_default=True, help="records to show")
@click.option("-f", "--follow", "follow_", is_flag=True, help="then print records as they are written")
@click.option("--json", "as_json", is_flag=True, help="the stored JSON lines")
@click.pass_obj
def tail_cmd(directory: Path, count, follow_, as_json):
    """The last records (newest last)."""
    for rec in tail(directory, count):
        click.echo(_line(rec, as_json))
    if not follow_:
        return
    try:
        for rec in follow(directory, sleep=_sleep):
            click.echo(_line(rec, as_json))
    except KeyboardInterrupt:
        return


@audit.command("show")
@click.option("--since", required=True, metavar="DATE|DURATION",
              help="a date (2026-12-01, 2026-12-01T10:00, local time unless it says +00:00/Z) or a "
                   "duration back from now (30m, 2h, 7d, 1h30m)")
@click.option("--kind", "kinds", multiple=True, metavar="K",
              help="only these kinds (repeatable; globs: 'model.*')")
@click.option("--json", "as_json", is_flag=True, help="the stored JSON lines")
@click.option("--prompts", is_flag=True,
              help="open the sealed prompts (--audit-record-prompts) with the home's storage key")
@click.pass_obj
def show_cmd(directory: Path, since, kinds, as_json, prompts):
    """Records written since DATE or in the last DURATION, oldest first."""
    start = parse_since(since, time.time())
    opener = _prompt_opener(directory) if prompts else None
    for rec in read_records(directory):
        if not isinstance(rec.get("ts"), (int, float)) or rec["ts"] < start:
            continue
        if kinds and not any(fnmatch.fnmatchcase(str(rec.get("kind")), k) for k in kinds):
            continue
        if opener and "prompt_sealed" in rec:
            rec = {**rec, "prompt": opener(rec)}
        click.echo(_line(rec, as_json))


def _prompt_opener(directory: Path):
    """rec -> its prompt, or why it does not open (a dropped key has erased it for good)."""
    from llmos.audit.events import open_prompt
    from llmos.kernel.jobs.sealing import StorageKeyError, Unreadable, load_keyring
    try:
        keys = load_keyring(directory.parent, create=False)
    except StorageKeyError as exc:
        raise click.ClickException(str(exc)) from None

    def opener(rec):
        try:
            return open_prompt(rec, keys.open)
        except (Unreadable, ValueError) as exc:
            return f"<unreadable: {exc}>"
    return opener


@audit.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(path: Path):
    """Write a new HMAC key to PATH (0600; never over an existing file). Keep it away from the log."""
    try:
        generate_key(path)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; a key is never overwritten") from None
    click.echo(f"wrote a new audit key to {path}; point the daemon at it with LLMOS_AUDIT_KEY_FILE={path}")


def parse_since(text: str, now: float) -> float:
    """A start time (epoch seconds) from a duration back from `now` or a date."""
    value = text.strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", value)
    if parts and "".join(n + u for n, u in parts) == value:
        return now - sum(float(n) * _UNITS[u] for n, u in parts)
    try:
        return datetime.fromisoformat(value).timestamp()   # a naive date is local time
    except ValueError:
        raise click.BadParameter("use a duration (30m, 2h, 7d) or a date (2026-12-01, 2026-12-01T10:00)",
                                 param_hint="--since") from None


def _line(rec: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(rec, sort_keys=True, separators=(",", ":"))
    ts = rec.get("ts")
    when = (datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            if isinstance(ts, (int, float)) else "-")
    fields = " ".join(f"{k}={_value(v)}" for k, v in sorted(rec.items()) if k not in _HIDDEN)
    return f"{when}  #{rec.get('seq')}  {rec.get('kind')}  {fields}".rstrip()


def _value(v) -> str:
    if isinstance(v, str) and v and not any(c.isspace() or c in '"=' for c in v):
        return v
    return json.dumps(v, ensure_ascii=False)
