"""`llmos config show`: the config llmosd would run with, from its file and the defaults.

Works without a daemon: it reads the file as llmosd does (llmos/config_file.py), so a bad
file is the same one-line error, with its line, and exit code 1.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

from llmos import config_file
from llmos.config_file import FILE_NAME, OPTIONS, ConfigError
from llmos.paths import Paths


@click.group("config")
def config():
    """llmosd's config file ($LLMOS_HOME/config.toml; docs/config.md)."""


@config.command("show")
@click.option("--home", type=click.Path(file_okay=False), default=None, help="llmos state directory")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"the config file (default $LLMOS_HOME/{FILE_NAME})")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of TOML")
@click.pass_obj
def show(paths: Paths, home, config_path, as_json):
    """The effective config: the file's settings over the defaults, as TOML (or JSON). Flags
    given to llmosd override these when it starts."""
    paths = Paths.from_env(home) if home else paths
    path = Path(config_path) if config_path else paths.home / FILE_NAME
    try:
        file = config_file.load(path, required=config_path is not None)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    merged = config_file.effective(file, {})
    if as_json:
        click.echo(json.dumps({"config_file": str(path) if file.exists else None, **merged}, indent=2))
    else:
        source = f"{path} over the defaults" if file.exists else f"the defaults ({path} does not exist)"
        click.echo(f"# llmosd's config: {source}\n" + to_toml(merged), nl=False)


def to_toml(config: dict) -> str:
    """The merged config as a file llmosd reads back to the same config. Unset options
    (TOML has no null) are comments."""
    lines = [f"# {key}: not set" if config[key] is None else f"{key} = {_value(config[key])}" for key in OPTIONS]
    for name, settings in config.get("tenants", {}).items():
        lines += ["", f"[tenants.{_key(name)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in settings.items()]
    alerts = dict(config.get("alerts", {}))
    rules = alerts.pop("rules", [])
    if alerts:
        lines += ["", "[alerts]"] + [f"{_key(k)} = {_value(v)}" for k, v in alerts.items()]
    for rule in rules:
        lines += ["", "[[alerts.rules]]"] + [f"{_key(k)} = {_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(key: str) -> str:
    return key if _BARE.match(key) else _string(key)


def _string(s: str) -> str:
    return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in s) + '"'


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else "nan" if math.isnan(v) else repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if hasattr(v, "isoformat"):   # TOML dates and times, as tomllib gives them
        return v.isoformat()
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
