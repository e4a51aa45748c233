"""Alerts against a real daemon: a driver killed repeatedly fires a rule once, it resolves
once, and each is seen on GET /llmos/v1/alerts, in `llmos alerts`, in the kernel's log and
by the alert command (a real process writing to a file). Every wait polls with a generous
deadline; nothing sleeps and then asserts."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import Daemon, wait_for
from llmos.cli.main import cli
from llmos.kernel.alert_rules import DEFAULT_RULES, METRIC_FIGURES

RULE = {"name": "TestRestarts", "metric": "llmos_driver_restarts_total", "fn": "increase", "window": "30s",
        "where": {"driver": "tokenizer-tiny"}, "op": ">", "threshold": 1, "severity": "critical",
        "summary": "{driver} restarted {value} times in 30 s"}
TOKENIZER = "tokenizer-tiny"


def start(home: Path, model_dir: Path, record: Path) -> Daemon:
    """A Daemon whose config file (--config) carries the test's rule and alert command."""
    home.mkdir(parents=True, exist_ok=True)
    where = ", ".join(f'{k} = "{v}"' for k, v in RULE["where"].items())
    rule = "\n".join(f"{k} = {json.dumps(v)}" for k, v in RULE.items() if k != "where")
    config = home.parent / "llmos.toml"
    config.write_text(f"""[alerts]
command = {json.dumps(f"{sys.executable} {record}")}

[[alerts.rules]]
{rule}
where = {{ {where} }}

[[alerts.rules]]
name = "DriverRestarting"
enabled = false
""")
    return Daemon(home, [f"tiny={model_dir}"], "--max-restarts", "50", "--config", str(config))


def get(d: Daemon, path: str):
    try:
        with d.http(timeout=10) as c:
            r = c.get(path)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, json.JSONDecodeError):   # the io driver may be restarting
        return None


def tokenizer_pid(d: Daemon) -> int | None:
    ps = get(d, "/llmos/v1/ps")
    return next((p["pid"] for p in ps["processes"] if p["name"] == TOKENIZER), None) if ps else None


def ours(alerts: list[dict]) -> list[dict]:
    return [a for a in alerts if a["rule"] == RULE["name"]]


def delivered(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return ours([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def said_in(log: Path) -> tuple[int, int]:
    """(firing lines, resolved lines) of the test's alert in one log file."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "alert TestRestarts{" in line]
    return sum(" firing " in line for line in lines), sum(" resolved " in line for line in lines)


@pytest.fixture
def daemon(tmp_path, tiny_llama_dir):
    out = tmp_path / "delivered.jsonl"
    record = tmp_path / "record.py"
    record.write_text(f"import sys\nopen({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')\n")
    d = start(tmp_path / "home", tiny_llama_dir, record)
    try:
        yield d.wait_ready(), out
    finally:
        d.stop()


def test_a_driver_killed_repeatedly_fires_the_alert_once_and_it_resolves_once(daemon):
    d, out = daemon
    first = get(d, "/llmos/v1/alerts")
    assert first["active"] == [] and first["failing"] == {}
    assert set(first["rules"]) == {RULE["name"]} | {r["name"] for r in DEFAULT_RULES} - {"DriverRestarting"}
    assert first["rules"]["TestRestarts"] == "increase(llmos_driver_restarts_total{driver=tokenizer-tiny}[30s]) > 1"

    # Kill the tokenizer as soon as each new one exists, until the rule fires (two restarts
    # in its window are enough; however slow the machine, the next kill follows the restart).
    kills = 0
    while not ours((get(d, "/llmos/v1/alerts") or {"active": []})["active"]):
        assert kills < 10, "the alert did not fire after 10 restarts"
        pid = wait_for(lambda: tokenizer_pid(d), 120, "a tokenizer pid")
        os.kill(pid, signal.SIGKILL)
        kills += 1
        wait_for(lambda: tokenizer_pid(d) not in (None, pid), 120, "the tokenizer restarted")
    assert kills >= 2
    (firing,) = ours(get(d, "/llmos/v1/alerts")["active"])
    assert firing["state"] == "firing" and firing["severity"] == "critical"
    assert firing["labels"] == {"driver": TOKENIZER, "role": "tokenizer"} and firing["value"] > 1
    assert firing["summary"].startswith(f"{TOKENIZER} restarted ")
    wait_for(lambda: delivered(out), 60, "the command got the firing alert")

    # No more kills: once the restarts leave the window it resolves, once.
    resolved = wait_for(lambda: ours((get(d, "/llmos/v1/alerts") or {"recent": []})["recent"]), 180,
                        "the alert resolved")
    assert [a["state"] for a in resolved] == ["resolved"] and resolved[0]["resolved_at"] >= firing["fired_at"]
    assert not ours(get(d, "/llmos/v1/alerts")["active"])
    def both():
        lines = delivered(out)
        return lines if len(lines) >= 2 else None
    got = wait_for(both, 60, "the command got both")
    assert [a["state"] for a in got] == ["firing", "resolved"]
    assert got[0]["fired_at"] == firing["fired_at"] and got[1]["resolved_at"] == resolved[0]["resolved_at"]

    # One line each in the kernel's log (its stderr, or its own log file where it writes one).
    said = {f.name: said_in(f) for f in [d.home / "llmosd.out", *sorted((d.home / "logs").glob("kernel*.log"))]}
    assert (1, 1) in said.values() and all(f <= 1 and r <= 1 for f, r in said.values()), said

    cli_out = CliRunner().invoke(cli, ["--home", str(d.home), "alerts", "--rules"])
    assert cli_out.exit_code == 0, cli_out.output
    assert "no alerts firing or pending" in cli_out.output and "TestRestarts" in cli_out.output
    assert "tokenizer-tiny restarted" in cli_out.output and "KVCacheFull" in cli_out.output

    # ...and the daemon serves as before.
    wait_for(lambda: any(p["name"] == TOKENIZER and p["state"] == "running"
                         for p in (get(d, "/llmos/v1/ps") or {"processes": []})["processes"]), 120, "tokenizer up")
    with d.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "after the alert", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        scraped = c.get("/metrics").text
    # Every family on /metrics is a figure a rule may name, with its kind and labels.
    for fam in text_string_to_metric_families(scraped):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        assert name in METRIC_FIGURES, name
        kind, labels = METRIC_FIGURES[name]
        assert fam.type == kind, name
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample.labels)
