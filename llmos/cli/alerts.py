"""`llmos alerts`: the daemon's alerts, firing and pending, then the recent resolved ones
(GET /llmos/v1/alerts; the rules and what to do: docs/alerts.md)."""
from __future__ import annotations

import json
import time

import click

from llmos.cli.format import dur, print_table
from llmos.client import Client
from llmos.paths import Paths


def _labels(alert: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in (alert.get("labels") or {}).items()) or "-"


def _ago(t, now: float) -> str:
    return "-" if not isinstance(t, (int, float)) else dur(max(0.0, now - t)) + " ago"


def _value(v) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.4g}"


@click.command()
@click.option("--rules", "show_rules", is_flag=True, help="also list every rule and its condition")
@click.option("--json", "as_json", is_flag=True, help="print the daemon's answer as JSON")
@click.pass_obj
def alerts(paths: Paths, show_rules: bool, as_json: bool):
    """Alerts firing and pending now, and the recently resolved ones."""
    with Client(paths.home, timeout=10) as c:
        data = c.alerts()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    now = time.time()
    active = data.get("active", [])
    if active:
        print_table(["ALERT", "STATE", "SEVERITY", "LABELS", "VALUE", "SINCE", "SUMMARY"],
                    [[a.get("rule"), a.get("state"), a.get("severity"), _labels(a), _value(a.get("value")),
                      _ago(a.get("fired_at") or a.get("active_since"), now), a.get("summary")] for a in active])
    else:
        click.echo("no alerts firing or pending")
    recent = data.get("recent", [])
    if recent:
        click.echo()
        print_table(["RESOLVED", "ALERT", "SEVERITY", "LABELS", "FIRED FOR", "SUMMARY"],
                    [[_ago(a.get("resolved_at"), now), a.get("rule"), a.get("severity"), _labels(a),
                      dur((a.get("resolved_at") or 0) - (a.get("fired_at") or 0)), a.get("summary")] for a in recent])
    for name, why in (data.get("failing") or {}).items():
        click.echo(f"rule {name} cannot be evaluated: {why}", err=True)
    if show_rules:
        click.echo()
        print_table(["RULE", "CONDITION"], sorted((data.get("rules") or {}).items()))
