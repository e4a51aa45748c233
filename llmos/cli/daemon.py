"""llmosd: the daemon in the foreground (for systemd, or `llmos start` in the background)."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import grp
import logging
import os
import signal

import click
from click.core import ParameterSource

from llmos import config_file
from llmos.config import DaemonConfig
from llmos.logging_setup import setup_logging
from llmos.config_file import (ALERT_KEYS, DEFAULTS, FILE_NAME, LOG_LEVELS, OPTIONS, TENANT_KEYS, ConfigError,
                               tenant_config)
from llmos.kernel.tenants import ALL, DEFAULT_TENANT
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


def tenant_settings(spec: str) -> tuple[str, dict]:
    """'alice:weight=3,max_concurrent=8' -> ('alice', {'weight': 3.0, 'max_concurrent': 8}),
    the settings as a [tenants.alice] table spells them (a quota 'none' or 'unlimited' is
    "none"). Raises ValueError naming what is wrong."""
    name, _, text = spec.partition(":")
    if not name:
        raise ValueError(f"tenant spec {spec!r} has no name")
    settings: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        kind = TENANT_KEYS.get(key)
        if kind is None:
            raise ValueError(f"unknown tenant setting {key!r} (known: {', '.join(TENANT_KEYS)})")
        if kind == "quota":
            settings[key] = "none" if value.lower() in ("none", "unlimited") else int(value)
        else:
            settings[key] = float(value) if kind == "number" else value
    tenant_config(name, settings)   # (raises now, naming the setting)
    return name, settings


def parse_tenant(spec: str):
    """'alice:weight=3,max_concurrent=8' -> ('alice', TenantConfig(weight=3.0, max_concurrent=8)).
    The name '*' sets the config of the tenants nobody configured: its unset keys keep
    DEFAULT_TENANT's values (a named tenant's unset quotas are unlimited). A quota given
    as 'none' is unlimited."""
    name, settings = tenant_settings(spec)
    return name, tenant_config(name, settings)


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


class BadConfig(click.ClickException):
    """A config file llmosd cannot use (exit 2, like a bad flag)."""
    exit_code = 2


D = DEFAULTS   # the flags' defaults are the file's (llmos/config_file.py)
_NOT_FILE_KEYS = {"home", "config_path", "tenant_specs"}
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--home", envvar="LLMOS_HOME", default=None, help="state directory (default ~/.llmos)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"config file (default $LLMOS_HOME/{FILE_NAME}, if there); the flags given override it")
@click.option("--model", "models", multiple=True, default=D["models"],
              help="model to serve: a built-in name, name=/path/to/hf-dir, or name=/path/file.gguf")
@click.option("--dtype", type=click.Choice(OPTIONS["dtype"].choices), default=D["dtype"],
              help="weights and KV; int4: 4-bit linears (the GGUF's own Q4_1 codes), bf16 KV, CPU only; "
                   "int8: int4 with the products of big steps in int8 arithmetic (faster, less exact)")
@click.option("--device", default=D["device"], help="auto, cpu, cuda or cuda:N")
@click.option("--kv-memory", default=D["kv_memory"], help="KV pool budget: bytes, '4GiB', or a fraction of free memory")
@click.option("--block-size", type=click.IntRange(1), default=D["block_size"])
@click.option("--max-num-seqs", type=click.IntRange(1), default=D["max_num_seqs"], help="most sequences in one step")
@click.option("--max-batched-tokens", type=click.IntRange(1), default=D["max_batched_tokens"],
              help="token budget per step")
@click.option("--max-model-len", type=click.IntRange(1), default=None, help="cap the context length")
@click.option("--drain-timeout", type=click.FloatRange(0), default=D["drain_timeout"],
              help="seconds in-flight requests may finish on SIGTERM")
@click.option("--first-answer-timeout", type=click.FloatRange(0), default=D["first_answer_timeout"],
              help="seconds the io driver waits for the kernel's first answer to a request")
@click.option("--prefix-caching/--no-prefix-caching", default=D["prefix_caching"],
              help="reuse KV of shared prompt prefixes")
@click.option("--swap-memory", default=D["swap_memory"], help="host swap pool for preempted sequences (0 disables)")
@click.option("--preemption-mode", type=click.Choice(OPTIONS["preemption_mode"].choices),
              default=D["preemption_mode"], help="how a preempted sequence gives its memory back")
@click.option("--scheduler", type=click.Choice(OPTIONS["scheduler"].choices), default=D["scheduler"],
              help="priority: classes, tenants with fair shares, aging; fcfs: arrival order")
@click.option("--tenant", "tenant_specs", multiple=True, metavar="NAME:KEY=VALUE,...",
              help="tenant settings, e.g. alice:weight=3,max_concurrent=8,max_queued=100,"
                   "tokens_per_minute=60000,default_priority=batch (repeatable); a quota 'none' is "
                   f"unlimited. '{ALL}' sets the others' (default max_concurrent={DEFAULT_TENANT.max_concurrent},"
                   f"max_queued={DEFAULT_TENANT.max_queued}). Replaces the file's tenant of that name")
@click.option("--request-timeout", type=click.FloatRange(0), default=None,
              help="default total deadline of a request, seconds")
@click.option("--queue-timeout", type=click.FloatRange(0), default=None,
              help="default deadline for a request to start running, seconds")
@click.option("--max-restarts", type=click.IntRange(0), default=D["max_restarts"],
              help="restarts of one driver within 60 s before it is failed")
@click.option("--keep-alive", default=D["keep_alive"],
              help="an on-demand model unloads this long after its last request (seconds, '5m', -1: never)")
@click.option("--max-loaded-models", type=int, default=None,
              help="models in memory at once, each with kv-memory / N of KV (default: the number of --model)")
@click.option("--replicas", type=click.IntRange(1, 64), default=D["replicas"],
              help="model drivers per --model model; requests are balanced between them (cache-aware)")
@click.option("--allow-local-users", is_flag=True, default=D["allow_local_users"],
              help="other local users may use the socket without an API key (as the default tenant)")
@click.option("--socket-mode", default=D["socket_mode"], help="the API socket's mode, octal: 660 lets --socket-group in")
@click.option("--socket-group", default=None, help="the API socket's group")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="also serve the API over TCP (off by default); every request there needs an API key")
@click.option("--tls-cert", default=None, help="PEM certificate: serve TLS on --listen")
@click.option("--tls-key", default=None, help="PEM private key for --tls-cert")
@click.option("--audit-key-file", default=None, help="HMAC key (0600 file) signing the audit chain")
@click.option("--audit-record-prompts", is_flag=True, default=D["audit_record_prompts"],
              help="keep prompt text in the audit log (off: never)")
@click.option("--job-retention-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="delete ended batch jobs and their files after this many days (default: keep)")
@click.option("--replica-devices", default="",
              help="devices the replicas spread over, e.g. cuda:0,cuda:1, or 'all' GPUs (default: --device)")
@click.option("--memory-limit", default=None,
              help="weights + KV of all loaded models together: bytes or '8GiB' (default: what the device has)")
@click.option("--kv-events-endpoint", default=None, metavar="ENDPOINT",
              help="publish the prefix cache's events on this ZeroMQ PUB endpoint, e.g. tcp://*:5557")
@click.option("--kv-events-pod", default=None, help="the pod name in their topic kv@POD@MODEL (default: the host name)")
@click.option("--kv-events-hash-seed", default=D["kv_events_hash_seed"], help="seeds the block hashes (llm-d's HashSeed)")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=D["log_level"],
              help="the kernel's and the drivers' (SIGHUP reloads it)")
def main(home, config_path, **_flags) -> None:
    """Run the llmos daemon in the foreground. Options not given as flags come from the
    config file (see docs/config.md); SIGHUP re-reads it."""
    os.umask(0o077)   # logs, databases, keys and sockets: private to the daemon's user
    paths = Paths.from_env(home)
    try:
        file, config = resolve(click.get_current_context(), paths)
        log_level = config.effective["log_level"]
        os.environ["LLMOS_HOME"] = str(paths.home)
        os.environ["LLMOS_LOG_LEVEL"] = log_level
        paths.ensure()
        setup_logging("kernel", paths.logs_dir, log_level)   # JSON lines, rotated (llmos/logging_setup.py)
        claim_pid_file(paths)
        with _blame(file, config.cli_overrides):
            _give_socket_group(paths, config.socket_group)
    except ConfigError as exc:
        raise BadConfig(str(exc)) from None
    if file.exists:
        logging.getLogger(__name__).info("config file %s", file.path)
    import uvloop

    from llmos.kernel.core import Kernel
    # Until the kernel's loop takes SIGHUP over, a reload must not kill the daemon (a handler,
    # not SIG_IGN: drivers started meanwhile get the default back at exec).
    signal.signal(signal.SIGHUP, lambda *_: logging.getLogger(__name__).warning("SIGHUP before the kernel "
                                                                               "is up: not reloaded"))
    try:
        uvloop.run(Kernel(config, paths).run())
    finally:
        for f in (paths.pid_file, paths.api_socket):
            try:
                if f != paths.pid_file or f.read_text().strip() == str(os.getpid()):
                    f.unlink()
            except FileNotFoundError:
                pass


def given_flags(ctx: click.Context) -> dict:
    """The options the user gave on the command line (or through the environment), spelled
    as the file spells them: only these override the file, never a flag's default."""
    given = {}
    for name, value in ctx.params.items():
        if name in _NOT_FILE_KEYS or ctx.get_parameter_source(name) not in _GIVEN:
            continue
        if name == "models":
            value = list(value)
        elif name == "replica_devices":
            value = [d.strip() for d in value.split(",") if d.strip()]
        elif name == "log_level":
            value = value.upper()
        given[name] = value
    if ctx.get_parameter_source("tenant_specs") in _GIVEN:
        try:
            given["tenants"] = dict(tenant_settings(spec) for spec in ctx.params["tenant_specs"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tenant") from None
    return given


def resolve(ctx: click.Context, paths: Paths) -> tuple[config_file.FileConfig, DaemonConfig]:
    """The file (the default one only if it exists), then the flags given: the DaemonConfig,
    which also carries what SIGHUP needs (the file's path, the flags' values)."""
    explicit = ctx.params.get("config_path")
    file = config_file.load(explicit or paths.home / FILE_NAME, required=explicit is not None)
    given = given_flags(ctx)
    merged = config_file.effective(file, given)
    with _blame(file, given):
        config = build_config(paths, merged)
    config.config_file, config.cli_overrides, config.effective = str(file.path), given, merged
    return file, config


def build_config(paths: Paths, c: dict) -> DaemonConfig:
    """The merged options (file keys) -> DaemonConfig, checked; a bad one is a BadParameter
    naming its flag."""
    lifecycle = check_options(paths, c["models"], c["kv_memory"], c["swap_memory"], c["keep_alive"],
                              c["max_loaded_models"], c["memory_limit"], c["replicas"])
    try:
        if not 0 <= int(c["socket_mode"], 8) <= 0o777:
            raise ValueError("out of range")
    except ValueError as exc:
        raise click.BadParameter(f"{c['socket_mode']!r}: give octal such as 600 or 660 ({exc})",
                                 param_hint="--socket-mode") from None
    try:
        tenants = config_file.tenant_configs(c["tenants"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tenant") from None
    from llmos.kernel.mem.device import select_device
    devices = list(c["replica_devices"])
    for d in devices if devices != ["all"] else []:
        try:
            select_device(d)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--replica-devices") from None
    same = {f.name for f in dataclasses.fields(DaemonConfig)} & c.keys() - {"models", "tenants", "replica_devices",
                                                                          *lifecycle}
    alerts = {field: c["alerts"].get(key) for key, field in ALERT_KEYS.items()}   # alert_rules, ...
    return DaemonConfig(models=list(c["models"]), tenants=tenants, replica_devices=devices,
                        request_timeout_s=c["request_timeout"], queue_timeout_s=c["queue_timeout"],
                        **alerts, **lifecycle, **{k: c[k] for k in same})


@contextlib.contextmanager
def _blame(file: config_file.FileConfig, given: dict):
    """A bad value that came from the file is the file's error, with its line."""
    try:
        yield
    except click.BadParameter as exc:
        hint = (exc.param_hint or "").lstrip("-").replace("-", "_")
        key = {"model": "models", "tenant": "tenants"}.get(hint, hint)
        if key in given or not (key in file.options or key == "tenants" and file.tenants):
            raise
        raise file.error(f"{key}: {exc.message}", key) from None


def _give_socket_group(paths: Paths, group: str | None) -> None:
    """The group must be able to reach the socket: traverse only (0710)."""
    if not group:
        return
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        for d in (paths.home, paths.run_dir):
            os.chown(d, -1, gid)
            os.chmod(d, 0o710)
    except (KeyError, OSError, ValueError) as exc:
        raise click.BadParameter(f"{group!r}: {exc}", param_hint="--socket-group") from None


if __name__ == "__main__":
    main()
