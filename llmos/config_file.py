"""The daemon's config file: $LLMOS_HOME/config.toml, or `llmosd --config PATH`.

Every llmosd option is a top-level key named as its flag without the dashes in front, with
`_` for `-` (`--kv-memory 4GiB` is `kv_memory = "4GiB"`; the repeatable `--model` is the
list `models`). `[tenants.NAME]` tables hold what `--tenant NAME:k=v,...` holds, and
`[[alerts.rules]]` the alert rules. Flags override the file; the file overrides defaults.

Read by llmosd at start (llmos/cli/daemon.py), by `llmos config show`, and again by the
kernel on SIGHUP (llmos/kernel/reload.py), so nothing here imports click or torch. Every
error is a ConfigError naming the file and, where it can be found, the line.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:   # Python 3.10: the same parser, as a package
    import tomli as tomllib

from llmos.kernel.alert_delivery import check_targets
from llmos.kernel.alert_rules import parse_rules
from llmos.config_lines import line_of
from llmos.kernel.tenants import ALL, DEFAULT_TENANT, TenantConfig
from llmos.sampling_params import MAX_TENANT_CHARS

FILE_NAME = "config.toml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A config file that cannot be used: `path:line: message` (no line when none applies)."""

    def __init__(self, path, message: str, line: int | None = None):
        self.path, self.message, self.line = str(path), message, line
        super().__init__(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# kind -> (accepts the TOML value, what the error says it must be)
KINDS = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "size": (lambda v: isinstance(v, str) or _is_int(v), 'a size such as "4GiB", or bytes'),
    "duration": (lambda v: isinstance(v, str) or _is_number(v), 'seconds, or a duration such as "5m"'),
    "octal": (lambda v: isinstance(v, str) or _is_int(v), 'an octal mode such as "660"'),
}


@dataclass(frozen=True)
class Option:
    default: object
    kind: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None   # an exclusive minimum


# Every llmosd option. The flags' defaults are taken from here (llmos/cli/daemon.py).
# None means unset: TOML has no null, so such an option is left out of the file to keep it unset.
OPTIONS: dict[str, Option] = {
    "models": Option(["smollm2"], "strings"),
    "dtype": Option("float32", "string", ("float32", "bfloat16", "int4", "int8")),
    "device": Option("auto", "string"),
    "kv_memory": Option("1GiB", "size"),
    "block_size": Option(16, "integer", minimum=1),
    "max_num_seqs": Option(128, "integer", minimum=1),
    "max_batched_tokens": Option(1024, "integer", minimum=1),
    "max_model_len": Option(None, "integer", minimum=1),
    "drain_timeout": Option(30.0, "number", minimum=0),
    "first_answer_timeout": Option(600.0, "number", minimum=0),
    "prefix_caching": Option(True, "boolean"),
    "swap_memory": Option("512MiB", "size"),
    "preemption_mode": Option("auto", "string", ("auto", "swap", "recompute")),
    "scheduler": Option("priority", "string", ("priority", "fcfs")),
    "request_timeout": Option(None, "number", minimum=0),
    "queue_timeout": Option(None, "number", minimum=0),
    "max_restarts": Option(5, "integer", minimum=0),
    "keep_alive": Option("5m", "duration"),
    "max_loaded_models": Option(None, "integer", minimum=1, maximum=64),
    "replicas": Option(1, "integer", minimum=1, maximum=64),
    "replica_devices": Option([], "strings"),
    "allow_local_users": Option(False, "boolean"),
    "socket_mode": Option("600", "octal"),
    "socket_group": Option(None, "string"),
    "listen": Option(None, "string"),
    "tls_cert": Option(None, "string"),
    "tls_key": Option(None, "string"),
    "audit_key_file": Option(None, "string"),
    "audit_record_prompts": Option(False, "boolean"),
    "job_retention_days": Option(None, "number", above=0),
    "memory_limit": Option(None, "size"),
    "kv_events_endpoint": Option(None, "string"),
    "kv_events_pod": Option(None, "string"),
    "kv_events_hash_seed": Option("", "string"),
    "log_level": Option("INFO", "string", LOG_LEVELS),
}
DEFAULTS = {key: o.default for key, o in OPTIONS.items()}
TABLES = ("tenants", "alerts")

# [tenants.NAME]: key -> kind. A quota may also be "none" (unlimited).
TENANT_KEYS = {"weight": "number", "default_priority": "string", "max_concurrent": "quota",
               "max_queued": "quota", "tokens_per_minute": "quota"}
# [alerts]: DaemonConfig's alert_rules, alert_command and alert_webhook (docs/alerts.md).
ALERT_KEYS = {"rules": "alert_rules", "command": "alert_command", "webhook": "alert_webhook"}


@dataclass
class FileConfig:
    """What one config file says (only what it sets; `effective` adds defaults and flags)."""
    path: Path
    text: str = ""
    options: dict = field(default_factory=dict)   # option key -> its value, normalized
    tenants: dict = field(default_factory=dict)   # tenant name -> {setting: value}
    alerts: dict = field(default_factory=dict)    # the [alerts] table; "rules": a list of tables
    exists: bool = False

    def error(self, message: str, *where: str, nth: int = 0) -> ConfigError:
        """An error about the key at `where` (table names, then the key), with its line."""
        return ConfigError(self.path, message, line_of(self.text, where, nth) if where else None)


def load(path, required: bool = True) -> FileConfig:
    """Read and check the file. A missing file is an error only when `required` (an
    explicit --config); otherwise it is an empty config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(path, "no such file") from None
        return FileConfig(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(where.group(1)) if where else len(text.splitlines()) or 1   # "(at end of document)"
        message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        raise ConfigError(path, f"not valid TOML: {message}", line) from None
    file = FileConfig(path, text, exists=True)
    for key, value in data.items():
        if key in OPTIONS:
            file.options[key] = _option(file, key, value)
        elif key == "tenants":
            file.tenants = _tenants(file, value)
        elif key == "alerts":
            file.alerts = _alerts(file, value)
        else:
            raise file.error(_unknown("key", key, [*OPTIONS, *TABLES]), key)
    return file


def effective(file: FileConfig | None, overrides: dict) -> dict:
    """The config in force: defaults, then the file, then what the command line gave
    (`overrides`: option key -> value; "tenants": name -> settings, replacing the file's
    tenant of that name whole)."""
    config = copy.deepcopy(DEFAULTS)
    config.update(file.options if file else {})
    config.update({k: v for k, v in overrides.items() if k != "tenants"})
    config["tenants"] = {**(file.tenants if file else {}), **overrides.get("tenants", {})}
    config["alerts"] = dict(file.alerts) if file else {}
    return config


def tenant_config(name: str, settings: dict) -> TenantConfig:
    """Settings as the file or --tenant gives them -> a TenantConfig. '*' starts from
    DEFAULT_TENANT (its unset quotas keep their bounds); a named tenant's unset quotas are
    unlimited. Raises ValueError naming the bad setting."""
    values = {k: None if isinstance(v, str) and k in _QUOTAS else v for k, v in settings.items()}
    if "weight" in values:
        values["weight"] = float(values["weight"])
    return dataclasses.replace(DEFAULT_TENANT, **values) if name == ALL else TenantConfig(**values)


def tenant_configs(tenants: dict) -> dict[str, TenantConfig]:
    return {name: tenant_config(name, settings) for name, settings in tenants.items()}


def apply_log_level(level: str) -> None:
    logging.getLogger().setLevel(level)


# ---------------------------------------------------------------- checks, one value at a time
_QUOTAS = {k for k, kind in TENANT_KEYS.items() if kind == "quota"}


def _option(file: FileConfig, key: str, value):
    opt = OPTIONS[key]
    accepts, must_be = KINDS[opt.kind]
    if not accepts(value):
        raise file.error(f"{key} must be {must_be}, not {_toml_type(value)}", key)
    if opt.kind == "number":
        value = float(value)
    elif opt.kind in ("size", "octal"):
        value = str(value)
    elif key == "log_level":
        value = value.upper()
    if opt.choices and value not in opt.choices:
        raise file.error(f"{key} must be one of {', '.join(opt.choices)}, not {value!r}", key)
    if opt.above is not None and not value > opt.above:
        raise file.error(f"{key} must be > {opt.above:g}, not {value!r}", key)
    if opt.minimum is not None and value < opt.minimum or opt.maximum is not None and value > opt.maximum:
        bounds = f">= {opt.minimum:g}" if opt.maximum is None else f"from {opt.minimum:g} to {opt.maximum:g}"
        raise file.error(f"{key} must be {bounds}, not {value!r}", key)
    return value


def _tenants(file: FileConfig, value) -> dict:
    if not isinstance(value, dict):
        raise file.error("tenants must be tables: [tenants.NAME]", "tenants")
    out = {}
    for name, settings in value.items():
        if not isinstance(settings, dict):
            raise file.error(f"tenant {name!r} must be a table: [tenants.{name}]", "tenants", name)
        if not name or len(name) > MAX_TENANT_CHARS:
            raise file.error(f"a tenant name has 1 to {MAX_TENANT_CHARS} characters", "tenants", name)
        for key, v in settings.items():
            if key not in TENANT_KEYS:
                raise file.error(_unknown(f"tenant {name!r} setting", key, TENANT_KEYS), "tenants", name, key)
            quota = TENANT_KEYS[key] == "quota"
            if quota and isinstance(v, str) and v.lower() in ("none", "unlimited"):
                continue
            if quota and not _is_int(v) or not quota and not KINDS[TENANT_KEYS[key]][0](v):
                must = 'an integer or "none"' if quota else KINDS[TENANT_KEYS[key]][1]
                raise file.error(f"tenant {name!r}: {key} must be {must}, not {_toml_type(v)}", "tenants", name, key)
            try:
                tenant_config(name, {key: v})
            except ValueError as exc:
                raise file.error(f"tenant {name!r}: {exc}", "tenants", name, key) from None
        out[name] = {k: "none" if isinstance(v, str) and k in _QUOTAS else float(v) if k == "weight" else v
                     for k, v in settings.items()}
    return out


def _alerts(file: FileConfig, value) -> dict:
    """[alerts]: `command` and `webhook` (where alerts are delivered) and [[alerts.rules]],
    each rule checked by the alert engine's own parser (llmos/kernel/alert_rules.py)."""
    if not isinstance(value, dict):
        raise file.error("alerts must be a table: [alerts], with [[alerts.rules]]", "alerts")
    for key, v in value.items():
        if key not in ALERT_KEYS:
            raise file.error(_unknown("alerts key", key, ALERT_KEYS), "alerts", key)
        if key != "rules" and not isinstance(v, str):
            raise file.error(f"alerts.{key} must be a string, not {_toml_type(v)}", "alerts", key)
    try:
        check_targets(value.get("command"), value.get("webhook"))
    except ValueError as exc:
        key = "command" if str(exc).startswith("alert_command") else "webhook"
        raise file.error(f"alerts.{exc}", "alerts", key) from None
    rules = value.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise file.error("alerts.rules must be an array of tables: [[alerts.rules]]", "alerts", "rules")
    for i, rule in enumerate(rules):
        try:
            parse_rules([rule])
        except ValueError as exc:
            key = re.match(r"alert rule [^:]*: (\w+):", str(exc))
            raise file.error(str(exc), "alerts", "rules", *([key.group(1)] if key else []), nth=i) from None
    try:
        parse_rules(rules)   # (together: at most MAX_RULES)
    except ValueError as exc:
        raise file.error(str(exc), "alerts", "rules") from None
    return dict(value)


def _unknown(what: str, key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return f"unknown {what} {key!r}{hint}"


def _toml_type(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             dict: "a table"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)
