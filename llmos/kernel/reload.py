"""SIGHUP: re-read the config file and apply what can change while the daemon serves.

    read and check the whole file -> merge with the flags given at start -> compare with
    what is in force -> apply the reloadable changes -> log what was applied and what not

Reloadable: the tenants and their quotas (every loaded engine's tenant book, and the
config that engines loaded later are built from), the alert rules, and the log level.
Anything else that changed (dtype, kv_memory, listen, ...) needs a restart: it is logged
as not applied, and keeps being reported until then. A file that does not parse or check
changes nothing: the error is logged with its line. Flags given on the command line still
win over the file, as at start (config.cli_overrides).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from llmos import config_file
from llmos.config_file import ConfigError
from llmos.kernel.tenants import ALL, DEFAULT_TENANT, TenantBook

log = logging.getLogger(__name__)
RELOADABLE = ("tenants", "alerts", "log_level")


@dataclass
class ReloadReport:
    applied: list[str] = field(default_factory=list)         # "tenants (alice, bob)", "log_level", ...
    not_applied: dict[str, str] = field(default_factory=dict)   # key -> why
    error: str | None = None                                 # the file could not be used: nothing changed


def reload_config(kernel) -> ReloadReport:
    """Re-read kernel.config.config_file and apply it (module docstring). Never raises:
    whatever goes wrong is logged and reported, and the daemon serves on as it was."""
    try:
        return _reload(kernel)
    except Exception as exc:   # a reload must never take the daemon down
        log.exception("config reload failed; nothing more was changed")
        return ReloadReport(error=f"{type(exc).__name__}: {exc}")


def _reload(kernel) -> ReloadReport:
    config = kernel.config
    if not config.config_file:
        log.warning("config reload: this daemon has no config file; nothing changed")
        return ReloadReport(error="no config file")
    try:
        file = config_file.load(config.config_file, required=True)
        new = config_file.effective(file, config.cli_overrides)
        tenants = config_file.tenant_configs(new["tenants"])
    except (ConfigError, ValueError) as exc:
        log.error("config reload: %s; nothing changed", exc)
        return ReloadReport(error=str(exc))
    old = config.effective
    report = ReloadReport()
    old_alerts = old.setdefault("alerts", {})
    fixed = [(k, old.get(k), new[k]) for k in new if k not in RELOADABLE and new[k] != old.get(k)]
    fixed += [(f"alerts.{k}", old_alerts.get(k), new["alerts"].get(k)) for k in ("command", "webhook")
              if new["alerts"].get(k) != old_alerts.get(k)]   # (delivery is set up once, at start)
    for key, was, now in fixed:
        report.not_applied[key] = "needs a restart"
        log.warning("config reload: %s changed (%r -> %r) but needs a restart: not applied", key, was, now)
    if new["alerts"].get("rules") != old_alerts.get("rules"):
        _apply_alert_rules(kernel, new["alerts"].get("rules"), report)
    if new["tenants"] != old.get("tenants"):
        changed = sorted(set(new["tenants"]) ^ set(old.get("tenants", {})) | {
            n for n in new["tenants"] if new["tenants"][n] != old.get("tenants", {}).get(n)})
        _apply_tenants(kernel, tenants)
        old["tenants"] = new["tenants"]
        report.applied.append(f"tenants ({', '.join(changed)})")
    if new["log_level"] != old.get("log_level"):
        config_file.apply_log_level(new["log_level"])
        os.environ["LLMOS_LOG_LEVEL"] = new["log_level"]   # drivers take it when they next start
        old["log_level"] = new["log_level"]
        report.applied.append(f"log_level {new['log_level']} (drivers: when they next start)")
    log.info("config reloaded from %s: applied %s%s", file.path, "; ".join(report.applied) or "nothing new",
             f"; not applied (restart needed): {', '.join(report.not_applied)}" if report.not_applied else "")
    return report


def _apply_alert_rules(kernel, rules: list | None, report: ReloadReport) -> None:
    """The alert engine takes the rules whole (None: the file names none, the defaults apply);
    a bad rule changes none of them."""
    engine = getattr(kernel, "alerts", None)
    if engine is None:
        report.not_applied["alerts.rules"] = "this daemon has no alert engine"
        log.warning("config reload: alert rules changed but this daemon has no alert engine: not applied")
        return
    try:
        engine.set_rules(rules)
    except (ValueError, TypeError) as exc:
        report.not_applied["alerts.rules"] = str(exc)
        log.error("config reload: alert rules not applied: %s", exc)
        return
    kernel.config.effective["alerts"]["rules"] = rules
    kernel.config.alert_rules = rules
    report.applied.append(f"alert rules ({len(rules or [])} in the file)")


def _apply_tenants(kernel, tenants: dict) -> None:
    """Every loaded engine's tenant book gets the new configs (the accounting is kept: a
    tenant's virtual time, its minute window); engines built later read config.tenants.
    A tenant no longer named gets the default config."""
    removed = set(kernel.config.tenants) - set(tenants) - {ALL}
    kernel.config.tenants = tenants
    for engine in kernel.engines.values():
        book = getattr(getattr(engine.scheduler, "policy", None), "tenants", None)
        if not isinstance(book, TenantBook):   # not loaded yet, or --scheduler fcfs: no tenants
            continue
        book.configure(ALL, tenants.get(ALL, DEFAULT_TENANT))
        for name, tenant in tenants.items():
            if name != ALL:
                book.configure(name, tenant)
        for name in removed:
            book.configure(name, book.default)
