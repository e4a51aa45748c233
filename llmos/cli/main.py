"""`llmos`: the command line client of llmosd (as `docker` is of `dockerd`).

Every command except start/stop talks to the daemon through its API socket; a daemon that
is not running is a one-line error and exit code 1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import click
import psutil

import llmos
from llmos.cli import startup
from llmos.cli.format import dur, print_table
from llmos.cli.alerts import alerts
from llmos.cli.cluster import cluster
from llmos.cli.jobs import jobs, submit
from llmos.cli.audit import audit
from llmos.cli.config_cmd import config
from llmos.cli.keys import keys
from llmos.cli.logs import logs
from llmos.cli.service import service
from llmos.cli.storage_keys import rotate_storage
from llmos.cli.models import models
from llmos.cli.residency import load, scale, unload
from llmos.cli import upgrade as _upgrade  # noqa: F401  (adds `models upgrade | rollback | history`)
from llmos.cli.top import top
from llmos.client import Client, DaemonNotRunning, LlmosError
from llmos.logging_setup import STDERR_SUFFIX, cap_file
from llmos.paths import Paths


def daemon_command(args: list[str]) -> list[str]:
    """The argv that starts llmosd in the foreground (`llmos start` detaches it)."""
    return [sys.executable, "-m", "llmos.cli.daemon", *args]


def _daemon_env(paths: Paths) -> dict:
    # The daemon must import this same llmos, even from a source checkout run elsewhere.
    src = str(Path(llmos.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "LLMOS_HOME": str(paths.home), "PYTHONPATH": path}


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DaemonNotRunning:
            home = ctx.obj.home if isinstance(ctx.obj, Paths) else "$LLMOS_HOME"
            raise click.ClickException(f"llmosd is not running (home {home}); start it with `llmos start`") from None
        except LlmosError as exc:
            where = f" (param: {exc.param})" if exc.param else ""
            raise click.ClickException(f"{exc.status or 'error'} {exc.code or ''}: {exc.message}{where}") from None


@click.group(cls=_Group)
@click.version_option(llmos.__version__, prog_name="llmos", message="%(prog)s %(version)s")
@click.option("--home", envvar="LLMOS_HOME", type=click.Path(file_okay=False),
              help="llmos state directory (default $LLMOS_HOME or ~/.llmos)")
@click.pass_context
def cli(ctx, home):
    """llmos: an operating system for LLM inference on one machine."""
    ctx.obj = Paths.from_env(home)


def _client(paths: Paths, timeout: float | None = None) -> Client:
    return Client(paths.home) if timeout is None else Client(paths.home, timeout=timeout)


# ---------------------------------------------------------------- daemon lifecycle


def _daemon_pid(paths: Paths) -> int | None:
    """The pid in the pid file if that process is alive and is the one that wrote it."""
    try:
        pid = int(paths.pid_file.read_text().strip())
        proc = psutil.Process(pid)
        # A reused pid belongs to a process started after the pid file was written.
        if proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > paths.pid_file.stat().st_mtime + 1:
            return None
        return pid
    except (OSError, ValueError, psutil.Error):
        return None


def _healthy(paths: Paths) -> bool:
    try:
        with _client(paths, timeout=5) as c:
            return c.health().get("status") == "ok"
    except LlmosError:
        return False


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", "models", multiple=True, metavar="SPEC", help="model to load (repeatable)")
@click.option("--dtype", help="weights dtype, e.g. bfloat16")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait until healthy")
@click.argument("daemon_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def start(paths: Paths, models, dtype, timeout, daemon_args):
    """Start llmosd in the background, showing its progress; other options are passed to llmosd.
    Fails (exit 1) as soon as a driver fails, naming it and its error, and stops the daemon."""
    args = [a for m in models for a in ("--model", m)] + (["--dtype", dtype] if dtype else []) + list(daemon_args)
    pid = _daemon_pid(paths)
    if pid is not None or _healthy(paths):
        if args:   # exit 1: a script that asked for these must not go on as if it had them
            raise startup.not_applied(pid, args)
        click.echo(f"llmosd is already running{f' (pid {pid})' if pid else ''}")
        return
    paths.ensure()
    # Its JSON log is logs/kernel.log; its stderr keeps a crash and, readable, its warnings.
    log_path = cap_file(paths.logs_dir / f"kernel{STDERR_SUFFIX}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(daemon_command(args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**_daemon_env(paths), "LLMOS_LOG_ECHO": "WARNING"})
    startup.wait_started(paths, proc, log_path, timeout)


@cli.command()
@click.option("--timeout", default=60.0, show_default=True, help="seconds to wait for llmosd to drain and exit")
@click.pass_obj
def stop(paths: Paths, timeout):
    """Stop the background llmosd (SIGTERM: it drains in-flight work first)."""
    pid = _daemon_pid(paths)
    if pid is None:
        stale = paths.pid_file.exists()
        if stale:
            paths.pid_file.unlink(missing_ok=True)
        click.echo("llmosd is not running" + (" (removed a stale pid file)" if stale else ""))
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        raise click.ClickException(f"llmosd (pid {pid}) did not exit within {timeout:g} s; `kill -9 {pid}` forces it")
    if _daemon_pid(paths) is None:
        paths.pid_file.unlink(missing_ok=True)
    click.echo(f"llmosd stopped (pid {pid})")


@cli.command()
@click.pass_obj
def status(paths: Paths):
    """Health and models of the daemon; exit code 1 when it is not running."""
    try:
        with _client(paths, timeout=10) as c:
            health = c.health()
            models = c.models()
    except DaemonNotRunning:
        click.echo("llmosd is not running")
        sys.exit(1)
    except LlmosError as exc:
        click.echo(f"llmosd is not healthy: {exc.message}")
        sys.exit(1)
    pid = _daemon_pid(paths)
    click.echo(f"llmosd is running{f' (pid {pid})' if pid else ''}, socket {paths.api_socket}")
    for key, value in health.items():
        click.echo(f"  {key}: {value}")
    click.echo("models: " + (", ".join(m["id"] for m in models) or "(none)"))


# ---------------------------------------------------------------- generation


def _gen_options(fn):
    for opt in reversed([
        click.option("--max-tokens", type=int, help="most tokens to generate"),
        click.option("--temperature", type=float, help="0 for greedy"),
        click.option("--top-p", type=float),
        click.option("--seed", type=int),
        click.option("--system", help="system prompt"),
        click.option("--tenant", help="account the request to this tenant"),
    ]):
        fn = opt(fn)
    return fn


def _params(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _stream_answer(c: Client, model: str, messages: list, params: dict) -> str:
    parts = []
    for delta in c.stream_chat(model, messages, **params):
        parts.append(delta)
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    return "".join(parts)


@cli.command()
@click.argument("model")
@click.argument("prompt")
@_gen_options
@click.option("--format", "answer_format", type=click.Choice(["text", "json"]), default="text",
              help="json: the answer is a JSON object (constrained decoding)")
@click.option("--json-schema", "schema_file", type=click.File("r"),
              help="the answer is JSON valid against this JSON Schema file ('-': stdin)")
@click.pass_obj
def run(paths: Paths, model, prompt, system, answer_format, schema_file, **kw):
    """Answer PROMPT with MODEL, streaming the text as it is generated."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    params = _params(**kw)
    if schema_file is not None or answer_format == "json":
        params["response_format"] = _response_format(schema_file)
    with _client(paths) as c:
        _stream_answer(c, model, messages, params)


def _response_format(schema_file) -> dict:
    if schema_file is None:
        return {"type": "json_object"}
    try:
        schema = json.loads(schema_file.read(1 << 20))
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--json-schema") from None
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON Schema is an object", param_hint="--json-schema")
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@cli.command()
@click.argument("model")
@_gen_options
@click.pass_obj
def chat(paths: Paths, model, system, **kw):
    """Talk with MODEL; the conversation is kept. An empty line or Ctrl-D ends it."""
    messages = [{"role": "system", "content": system}] if system else []
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    with _client(paths) as c:
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": _stream_answer(c, model, messages, _params(**kw))})


# ---------------------------------------------------------------- inspection


@cli.command()
@click.pass_obj
def ps(paths: Paths):
    """Driver processes and requests in flight."""
    with _client(paths, timeout=10) as c:
        data = c.ps()
    print_table(["NAME", "ROLE", "PID", "STATE", "UPTIME", "RESTARTS"],
                [[p.get("name"), p.get("role"), p.get("pid"), p.get("state"), dur(p.get("uptime_s")),
                  p.get("restarts")] for p in data.get("processes", [])])
    requests = data.get("requests", [])
    click.echo()
    if not requests:
        click.echo("no requests in flight")
        return
    print_table(["REQUEST", "MODEL", "TENANT", "CLASS", "STATE", "WAITED", "PROMPT", "GENERATED", "AGE"],
                [[r.get("id"), r.get("model"), r.get("tenant"), r.get("priority"), r.get("state"),
                  dur(r.get("waited_s")), r.get("prompt_tokens"), r.get("output_tokens"), dur(r.get("age_s"))]
                 for r in requests])
    for model, sched in (data.get("scheduler") or {}).items():
        pre = sched.get("preemptions")
        if pre:
            click.echo(f"{model}: preemptions " + ", ".join(f"{k} {v}" for k, v in pre.items()))


@cli.command()
@click.argument("driver")
@click.pass_obj
def restart(paths: Paths, driver: str):
    """Restart one driver (e.g. model-smollm2, tokenizer-smollm2, io)."""
    with _client(paths, timeout=30) as c:
        c.restart_driver(driver)
    click.echo(f"restarting {driver}")


@cli.command()
@click.argument("request_id")
@click.pass_obj
def cancel(paths: Paths, request_id: str):
    """Stop a request in flight (the id `llmos ps` shows); it ends with what it has."""
    with _client(paths, timeout=10) as c:
        data = c.cancel_request(request_id)
    click.echo(f"cancelled {data['id']} ({data['cancelled']} choice(s) stopped)")


@cli.command()
@click.pass_obj
def mem(paths: Paths):
    """KV memory: pools, blocks by state, per-request blocks, prefix cache, swap traffic."""
    with _client(paths, timeout=10) as c:
        data = c.memory()
    for model, m in data.items():
        if "blocks_total" not in m:
            click.echo(f"{model}: {m.get('state', 'loading')}")
            continue
        mib = m["block_bytes"] / 2**20
        weights = m.get("accounting", {}).get("weight_bytes") or 0
        click.echo(f"{model} on {m['device']}: weights {weights / 2**20:.0f} MiB, KV {m['blocks_total']} blocks x "
                   f"{m['block_size']} tokens ({m['pool_bytes'] / 2**20:.0f} MiB)")
        used, cached = m["blocks_used"], m["blocks_cached_free"]
        free = m["blocks_free"] - cached
        rows = [["used", used, f"{used * mib:.1f}"], ["cached-free", cached, f"{cached * mib:.1f}"],
                ["free", free, f"{free * mib:.1f}"]]
        if m.get("swap"):
            host = m["swap"]["host_blocks_used"]
            rows.append(["swapped (host)", host, f"{host * mib:.1f}"])
        print_table(["STATE", "BLOCKS", "MIB"], rows)
        pc = m["prefix_cache"]
        click.echo(f"prefix cache: hit rate {pc['hit_rate']:.1%} ({pc['hit_tokens']}/{pc['queried_tokens']} tokens), "
                   f"{pc['evictions']} evictions; preemptions {m['preemptions']}")
        click.echo(f"sharing: {m['blocks_shared']} blocks shared now; {pc['forks']} forks (n > 1), "
                   f"{pc['cow_copies']} copy-on-write copies")
        if m.get("swap"):
            s = m["swap"]
            click.echo(f"swap ({s['mode']}): {s['swap_outs']} out / {s['swap_ins']} in, "
                       f"{s['bytes_out'] / 2**20:.1f} MiB out, {s['bytes_in'] / 2**20:.1f} MiB in")
        if m["requests"]:
            print_table(["REQUEST", "BLOCKS"], [[rid, n] for rid, n in m["requests"].items()])


# ---------------------------------------------------------------- batch jobs, models and top (llmos.cli.*)

cli.add_command(submit)
cli.add_command(jobs)
cli.add_command(models)
cli.add_command(top)
cli.add_command(load)
cli.add_command(unload)
cli.add_command(scale)
cli.add_command(keys)
keys.add_command(rotate_storage)   # llmos keys rotate-storage
cli.add_command(audit)
cli.add_command(config)
cli.add_command(logs)
cli.add_command(service)
cli.add_command(alerts)
cli.add_command(cluster)
