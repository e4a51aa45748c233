"""llmosd: the daemon in the foreground (for systemd, or `llmos start` in the background)."""
from __future__ import annotations

import dataclasses
import fcntl
import grp
import logging
import os
import sys

import click

from llmos.config import DaemonConfig
from llmos.logging_setup import setup_logging
from llmos.kernel.tenants import ALL, DEFAULT_TENANT, TenantConfig
from llmos.paths import Paths


_PID_LOCK: int | None = None   # held open for the daemon's life: the lock is the claim


def claim_pid_file(paths: Paths) -> None:
    """Refuse to start twice on one home: the pid file is locked (flock) while the daemon
    lives, so two daemons cannot both run its jobs; a file left by a killed daemon is unlocked
    and simply taken over."""
    global _PID_LOCK
    fd = os.open(paths.pid_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise click.ClickException(f"llmosd is already running (pid {holder}, home {paths.home})") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _PID_LOCK = fd
    if paths.api_socket.exists():
        paths.api_socket.unlink()  # stale: its daemon is gone


def parse_tenant(spec: str):
    """'alice:weight=3,max_concurrent=8' -> ('alice', TenantConfig(weight=3.0, max_concurrent=8)).
    The name '*' sets the config of the tenants nobody configured: its unset keys keep
    DEFAULT_TENANT's values (a named tenant's unset quotas are unlimited). A quota given
    as 'none' is unlimited."""
    def limit(value: str):
        return None if value.lower() in ("none", "unlimited") else int(value)
    name, _, settings = spec.partition(":")
    if not name:
        raise ValueError(f"tenant spec {spec!r} has no name")
    kinds = {"weight": float, "default_priority": str, "max_concurrent": limit, "max_queued": limit,
             "tokens_per_minute": limit}
    values = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise ValueError(f"unknown tenant setting {key!r} (known: {', '.join(kinds)})")
        values[key] = kinds[key](value)
    return name, dataclasses.replace(DEFAULT_TENANT, **values) if name == ALL else TenantConfig(**values)


def check_options(paths: Paths, models, kv_memory: str, swap_memory: str, keep_alive: str,
                  max_loaded: int | None, memory_limit: str | None, replicas: int = 1) -> dict:
    """Fail at once, naming the option, rather than after drivers have started."""
    from llmos.keep_alive import parse_keep_alive
    from llmos.kernel.mem.pool import parse_memory
    from llmos.models.names import ModelError, model_name
    from llmos.models.registry import parse_model_spec

    seen = set()
    for spec in models:
        try:
            parse_model_spec(spec, paths)
            name = model_name(spec)
        except (ModelError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--model") from None
        if name in seen:
            raise click.BadParameter(f"model {name!r} is given twice", param_hint="--model")
        seen.add(name)
    for hint, value in (("--kv-memory", kv_memory), ("--swap-memory", swap_memory)):
        try:
            if value not in ("0", "") or hint == "--kv-memory":
                if parse_memory(value, 2**40) <= 0:
                    raise ValueError("it must be more than 0")
        except (ValueError, OverflowError) as exc:
            raise click.BadParameter(f"{value!r}: {exc}", param_hint=hint) from None
    try:
        keep = parse_keep_alive(keep_alive)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--keep-alive") from None
    if max_loaded is not None and not 1 <= max_loaded <= 64:
        raise click.BadParameter("must be from 1 to 64", param_hint="--max-loaded-models")
    limit = None
    if memory_limit is not None:
        try:
            limit = parse_memory(memory_limit, 2**40)
        except (ValueError, OverflowError) as exc:
            raise click.BadParameter(f"{memory_limit!r}: {exc}", param_hint="--memory-limit") from None
    return {"keep_alive_s": keep, "max_loaded_models": max_loaded or max(1, len(models)) * replicas,
            "memory_limit_bytes": limit, "replicas": replicas}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--home", envvar="LLMOS_HOME", default=None, help="state directory (default ~/.llmos)")
@click.option("--model", "models", multiple=True, default=["smollm2"],
              help="model to serve: a built-in name, name=/path/to/hf-dir, or name=/path/file.gguf")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "int4"]), default="float32",
              help="weights and KV; int4: 4-bit linears (the GGUF's own Q4_1 codes), bf16 KV, CPU only")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N")
@click.option("--kv-memory", default="1GiB", help="KV pool budget: bytes, '4GiB', or a fraction of free memory")
@click.option("--block-size", type=int, default=16)
@click.option("--max-num-seqs", type=int, default=128, help="most sequences in one step")
@click.option("--max-batched-tokens", type=int, default=1024, help="token budget per step")
@click.option("--max-model-len", type=int, default=None, help="cap the context length")
@click.option("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests may finish on SIGTERM")
@click.option("--prefix-caching/--no-prefix-caching", default=True, help="reuse KV of shared prompt prefixes")
@click.option("--swap-memory", default="512MiB", help="host swap pool for preempted sequences (0 disables)")
@click.option("--preemption-mode", type=click.Choice(["auto", "swap", "recompute"]), default="auto",
              help="how a preempted sequence gives its memory back")
@click.option("--scheduler", type=click.Choice(["priority", "fcfs"]), default="priority",
              help="priority: classes, tenants with fair shares, aging; fcfs: arrival order")
@click.option("--tenant", "tenant_specs", multiple=True, metavar="NAME:KEY=VALUE,...",
              help="tenant settings, e.g. alice:weight=3,max_concurrent=8,max_queued=100,"
                   "tokens_per_minute=60000,default_priority=batch (repeatable); a quota 'none' is "
                   f"unlimited. '{ALL}' sets the others' (default max_concurrent={DEFAULT_TENANT.max_concurrent},"
                   f"max_queued={DEFAULT_TENANT.max_queued})")
@click.option("--request-timeout", "request_timeout_s", type=float, default=None,
              help="default total deadline of a request, seconds")
@click.option("--queue-timeout", "queue_timeout_s", type=float, default=None,
              help="default deadline for a request to start running, seconds")
@click.option("--max-restarts", type=int, default=5, help="restarts of one driver within 60 s before it is failed")
@click.option("--keep-alive", "keep_alive", default="5m",
              help="an on-demand model unloads this long after its last request (seconds, '5m', -1: never)")
@click.option("--max-loaded-models", type=int, default=None,
              help="models in memory at once, each with kv-memory / N of KV (default: the number of --model)")
@click.option("--replicas", type=click.IntRange(1, 64), default=1,
              help="model drivers per --model model; requests are balanced between them (cache-aware)")
@click.option("--allow-local-users", is_flag=True,
              help="other local users may use the socket without an API key (as the default tenant)")
@click.option("--socket-mode", default="600", help="the API socket's mode, octal: 660 lets --socket-group in")
@click.option("--socket-group", default=None, help="the API socket's group")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="also serve the API over TCP (off by default); every request there needs an API key")
@click.option("--tls-cert", default=None, help="PEM certificate: serve TLS on --listen")
@click.option("--tls-key", default=None, help="PEM private key for --tls-cert")
@click.option("--audit-key-file", default=None, help="HMAC key (0600 file) signing the audit chain")
@click.option("--audit-record-prompts", is_flag=True, help="keep prompt text in the audit log (off: never)")
@click.option("--job-retention-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="delete ended batch jobs and their files after this many days (default: keep)")
@click.option("--replica-devices", default="",
              help="devices the replicas spread over, e.g. cuda:0,cuda:1, or 'all' GPUs (default: --device)")
@click.option("--memory-limit", default=None,
              help="weights + KV of all loaded models together: bytes or '8GiB' (default: what the device has)")
@click.option("--log-level", default="INFO")
def main(home, models, log_level, tenant_specs, keep_alive, max_loaded_models, memory_limit, replicas,
         replica_devices, **options) -> None:
    """Run the llmos daemon in the foreground."""
    os.umask(0o077)   # logs, databases, keys and sockets: private to the daemon's user
    paths = Paths.from_env(home)
    lifecycle = check_options(paths, models, options["kv_memory"], options["swap_memory"], keep_alive,
                              max_loaded_models, memory_limit, replicas)
    os.environ["LLMOS_HOME"] = str(paths.home)
    os.environ["LLMOS_LOG_LEVEL"] = log_level
    paths.ensure()
    setup_logging("kernel", paths.logs_dir, log_level)   # JSON lines, rotated (llmos/logging_setup.py)
    claim_pid_file(paths)
    if options.get("socket_group"):   # the group must be able to reach the socket: traverse only (0710)
        try:
            g = options["socket_group"]
            gid = int(g) if g.isdigit() else grp.getgrnam(g).gr_gid
            for d in (paths.home, paths.run_dir):
                os.chown(d, -1, gid)
                os.chmod(d, 0o710)
        except (KeyError, OSError, ValueError) as exc:
            raise click.BadParameter(f"{options['socket_group']!r}: {exc}", param_hint="--socket-group") from None
    try:
        if not 0 <= int(options["socket_mode"], 8) <= 0o777:
            raise ValueError("out of range")
    except ValueError as exc:
        raise click.BadParameter(f"{options['socket_mode']!r}: give octal such as 600 or 660 ({exc})",
                                 param_hint="--socket-mode") from None
    try:
        tenants = dict(parse_tenant(spec) for spec in tenant_specs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tenant") from None
    devices = [d.strip() for d in replica_devices.split(",") if d.strip()]
    from llmos.kernel.mem.device import select_device
    for d in devices if devices != ["all"] else []:
        try:
            select_device(d)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--replica-devices") from None
    config = DaemonConfig(models=list(models), tenants=tenants, replica_devices=devices, **lifecycle, **options)
    import uvloop

    from llmos.kernel.core import Kernel
    try:
        uvloop.run(Kernel(config, paths).run())
    finally:
        for f in (paths.pid_file, paths.api_socket):
            try:
                if f != paths.pid_file or f.read_text().strip() == str(os.getpid()):
                    f.unlink()
            except FileNotFoundError:
                pass


if __name__ == "__main__":
    main()
