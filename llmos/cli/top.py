"""`llmos top`: a live view of the daemon, built from the socket API only (GET /health,
/llmos/v1/ps, /llmos/v1/memory, /llmos/v1/jobs, /llmos/v1/jobs/errors) via Client.status().

Tokens per second are the difference of two samples of each model's `tokens_computed`
(prefill + decode tokens the model processed) over the time between them.
"""
from __future__ import annotations

import time
from collections import Counter

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmos import names
from llmos.cli.format import add_row, console as output_console, dur, show, table
from llmos.client import Client, DaemonNotRunning, LlmosError
from llmos.paths import Paths

# The queue columns: every state ps shows but FORKING (a choice waiting the few steps until
# its first choice's prompt is computed, left out as it always was).
STATES = tuple(s for s in names.SHOWN_STATES if s != names.FORKING)
CLASSES = names.PRIORITY_CLASSES


def request_class(req: dict) -> str:
    """The priority class of a request in /llmos/v1/ps ("batch:0" -> "batch")."""
    priority = req.get("priority")
    if isinstance(priority, str) and priority:
        return priority.partition(":")[0]
    return "batch" if req.get("tenant") == "batch" else "interactive"   # a kernel without classes


def tokens_per_s(now: dict, before: dict | None, dt: float) -> dict[str, float | None]:
    """Per model tokens/s between two /memory samples (None without an earlier sample)."""
    out = {}
    for name, m in now.items():
        if not isinstance(m, dict):
            continue
        old = ((before or {}).get(name) or {}).get("steps", {}).get("tokens_computed")
        new = m.get("steps", {}).get("tokens_computed")
        out[name] = None if old is None or new is None or dt <= 0 else max(0.0, (new - old) / dt)
    return out


def render(snap: dict, rates: dict) -> Group:
    h, ps, mem = snap["health"], snap["ps"], snap["memory"]
    head = Text.assemble(("llmosd ", "bold"), (str(h.get("status")), "green" if h.get("status") == "ok" else "red"),
                         f"  pid {h.get('pid', '-')}  up {dur(h.get('uptime_s'))}  device {h.get('device', '-')}"
                         f"  requests in flight {h.get('requests_in_flight', '-')}")
    drivers = table(["NAME", "ROLE", "STATE", "PID", "UPTIME", "RESTARTS"], title="Drivers")
    for p in ps.get("processes", []):
        style = "" if p.get("state") == "running" else "yellow"
        add_row(drivers, (p.get("name"), p.get("role"), p.get("state"), p.get("pid"), dur(p.get("uptime_s")),
                          p.get("restarts")), style=style)
    requests = ps.get("requests", [])
    counts = Counter((request_class(r), r.get("state")) for r in requests)
    queues = table(["CLASS", *map(str.upper, STATES)], title="Queues by class")
    for cls in CLASSES:
        add_row(queues, (cls, *(counts[(cls, s)] for s in STATES)))
    running = [r for r in requests if r.get("state") == "running"]
    batch = table(["REQUEST", "MODEL", "CLASS", "PROMPT", "OUT", "AGE"],
                  title=f"Running batch ({len(running)} sequences)")
    for r in running[:8]:
        add_row(batch, (str(r.get("id"))[:40], r.get("model"), request_class(r), r.get("prompt_tokens"),
                        r.get("output_tokens"), dur(r.get("age_s"))))
    if len(running) > 8:
        add_row(batch, (f"... {len(running) - 8} more", "", "", "", "", ""))
    memory = table(["MODEL", "BLOCKS USED", "USE", "", "PREEMPTIONS"], title="KV memory")
    speed = table(["MODEL", "TOKENS/S", "STEPS", "KERNEL SHARE"], title="Throughput (tokens/s)")
    for name, m in mem.items():
        if not isinstance(m, dict):
            continue
        if "blocks_total" not in m:
            add_row(memory, (name, m.get("state", "-"), "", "", ""))
            add_row(speed, (name, "-", "-", "-"))
            continue
        used, total = m["blocks_used"], max(1, m["blocks_total"])
        bar = "#" * round(20 * used / total)
        add_row(memory, (name, f"{used}/{m['blocks_total']}", f"{100 * used / total:.0f}%", f"[{bar:<20}]",
                         m.get("preemptions", 0)))
        steps, rate = m.get("steps", {}), rates.get(name)
        add_row(speed, (name, "-" if rate is None else f"{rate:.1f}", steps.get("steps", "-"),
                        f"{100 * steps.get('kernel_share', 0):.1f}%"))
    jobs = table(["JOB", "STATUS", "DONE", "FAILED", "REQ/S", "ETA"], title="Batch jobs")
    for j in [j for j in snap.get("jobs", []) if j["status"] in ("in_progress", "finalizing", "cancelling")][:5]:
        c, x = j["request_counts"], j.get("llmos", {})
        add_row(jobs, (j["id"], j["status"], f"{c['completed'] + c['failed']}/{c['total']}", c["failed"],
                       x.get("throughput", {}).get("requests_per_s", "-"), dur(x.get("eta_s"))))
    return Group(head, Text(), drivers, Text(), queues, Text(), batch, Text(), memory, Text(), speed, Text(), jobs,
                 Text(), _errors(snap))


def _errors(snap: dict) -> Table:
    errors = table(["WHEN", "WHERE", "ERROR"], title="Recent errors")
    rows = [("now", f"driver {name}", "failed") for name in snap["health"].get("failed_drivers", [])]
    rows += [("-", f"driver {p['name']}", f"restarted {p['restarts']} time(s)")
             for p in snap["ps"].get("processes", []) if p.get("restarts")]
    rows += [(time.strftime("%H:%M:%S", time.localtime(e["at"])), f"{e['job']} line {e['line']}",
              f"{e['status']} {e['code']}: {e['message']}"[:100]) for e in reversed(snap.get("job_errors", [])[-5:])]
    for row in rows[:8] or [("", "none", "")]:
        add_row(errors, row)
    return errors


@click.command()
@click.option("--once", is_flag=True, help="print one frame and exit")
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.pass_obj
def top(paths: Paths, once, interval):
    """Live view: drivers, queues by class, the running batch, KV memory, tokens/s, jobs, errors."""
    console = output_console()
    with Client(paths.home, timeout=10) as c:
        before, t0 = c.status(), time.monotonic()
        if once:  # tokens/s needs two samples
            time.sleep(interval)
            snap, t1 = c.status(), time.monotonic()
            show(render(snap, tokens_per_s(snap["memory"], before["memory"], t1 - t0)), console)
            return
        with Live(render(before, {}), console=console, screen=console.is_terminal, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    try:
                        snap, t1 = c.status(), time.monotonic()
                    except DaemonNotRunning:
                        live.update(Text("llmosd is not running (waiting for it)", style="red"), refresh=True)
                        continue
                    except LlmosError as exc:
                        live.update(Text(f"llmosd answered: {exc.message}", style="red"), refresh=True)
                        continue
                    live.update(render(snap, tokens_per_s(snap["memory"], before["memory"], t1 - t0)), refresh=True)
                    before, t0 = snap, t1
            except KeyboardInterrupt:
                pass
