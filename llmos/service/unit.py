"""The systemd unit of llmosd, as `llmos service install` writes it (scripts/llmosd.service
is the system unit rendered with the defaults below; a test keeps the two equal).

Why each line is there is said in the unit itself, for the operator who reads it.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "llmosd.service"
SYSTEM_DIR = Path("/etc/systemd/system")


def user_unit_dir(home: Path | None = None) -> Path:
    """~/.config/systemd/user, or $XDG_CONFIG_HOME/systemd/user."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path(home or Path.home()) / ".config")
    return Path(config) / "systemd" / "user"


def llmosd_command() -> list[str]:
    """This installation's llmosd: beside the running interpreter (a venv's bin/), else on
    PATH, else this interpreter running the module."""
    beside = Path(sys.executable).parent / "llmosd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("llmosd")
    return [found] if found else [sys.executable, "-m", "llmos.cli.daemon"]


@dataclass(frozen=True)
class Unit:
    exec_start: list[str]                 # the llmosd command, without --home
    home: Path                            # $LLMOS_HOME of the service
    user_mode: bool = False               # a user unit (systemctl --user) rather than a system one
    run_as: str | None = None             # system unit: the account it runs as (User=)
    model_cache: Path | None = None       # LLMOS_MODEL_CACHE, if it lives outside the home
    timeout_stop_s: int = 90              # above --drain-timeout (30 s) plus stopping the drivers
    watchdog_s: int = 60                  # WatchdogSec: the kernel's loop must answer within this

    def text(self) -> str:
        start = " ".join(_quote(word).replace("$", "$$") for word in [*self.exec_start, "--home", str(self.home)])
        writable = " ".join(_quote(p) for p in (self.home, self.model_cache) if p is not None)
        env = [f"Environment={_quote(f'LLMOS_HOME={self.home}')}", "Environment=PYTHONUNBUFFERED=1"]
        if self.model_cache is not None:
            env.append(f"Environment={_quote(f'LLMOS_MODEL_CACHE={self.model_cache}')}")
        lines = [
            "# llmosd as a systemd service (written by `llmos service install`; docs/operations.md).",
            "[Unit]",
            "Description=llmos: LLM inference daemon (llmosd)",
            *([] if self.user_mode else ["After=network.target"]),
            "",
            "[Service]",
            "# llmosd sends READY=1 once /health is ok (every preloaded model serves), STOPPING=1 when",
            "# it starts draining, WATCHDOG=1 every WatchdogSec/2; only the kernel, not its drivers.",
            "Type=notify",
            "NotifyAccess=main",
            f"ExecStart={start}",
            "# SIGHUP re-reads $LLMOS_HOME/config.toml (tenants, quotas, alert rules, log level).",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "# SIGTERM to the kernel alone: it drains, then stops its drivers in reverse order itself;",
            "# whatever is left when TimeoutStopSec runs out is killed.",
            "KillSignal=SIGTERM",
            "KillMode=mixed",
            f"TimeoutStopSec={self.timeout_stop_s}",
            "# Loading (and, the first time, converting) a model can take minutes.",
            "TimeoutStartSec=900",
            f"WatchdogSec={self.watchdog_s}",
            "Restart=on-failure",
            "RestartSec=5",
            *env,
            "# Log JSON to the journal instead of $LLMOS_HOME/logs/ (then `llmos logs` has none to read):",
            "#Environment=LLMOS_LOG_TARGET=journal",
            "RuntimeDirectory=llmos",
            "RuntimeDirectoryMode=0700",
            "Environment=TMPDIR=%t/llmos",
            "UMask=0077",
            "",
            "# Hardening. /dev stays as it is: the KV pool is POSIX shared memory (/dev/shm) and a",
            "# GPU is a device node, so no PrivateDevices=.",
            "NoNewPrivileges=yes",
            *self._sandbox(writable),
            "",
            "[Install]",
            f"WantedBy={'default.target' if self.user_mode else 'multi-user.target'}",
        ]
        return "\n".join(lines) + "\n"

    def _sandbox(self, writable: str) -> list[str]:
        if self.user_mode:   # (a user manager can only mount namespaces with unprivileged user namespaces)
            return ["# A user unit keeps to what needs no mount namespace; a system unit adds",
                    "# ProtectSystem=strict, ProtectHome=read-only, PrivateTmp and more."]
        state = self.home.relative_to("/var/lib") if self.home.is_relative_to("/var/lib") else None
        return [f"User={self.run_as or 'llmos'}",
                *([f"StateDirectory={state}", "StateDirectoryMode=0700"] if state else []),
                "ProtectSystem=strict",
                "ProtectHome=read-only",
                f"ReadWritePaths={writable}",
                "PrivateTmp=yes",
                "ProtectKernelTunables=yes",
                "ProtectKernelModules=yes",
                "ProtectControlGroups=yes",
                "ProtectHostname=yes",
                "RestrictSUIDSGID=yes",
                "RestrictRealtime=yes",
                "LockPersonality=yes",
                "RestrictNamespaces=yes",
                "# AF_INET/AF_INET6 for --listen; AF_NETLINK for the GPU driver's and psutil's queries.",
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                "SystemCallArchitectures=native",
                "# Not here: PrivateDevices= and ProtectClock= (each closes device access: no GPU),",
                "# MemoryDenyWriteExecute= (torch compiles kernels at run time)."]


def _quote(value) -> str:
    """A value systemd reads as one word: '%' doubled (its specifiers), double quotes with
    backslash escapes around anything with a space or a quote."""
    text = str(value).replace("%", "%%")
    if not any(c in text for c in ' "\\\'\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def example() -> str:
    """scripts/llmosd.service: a system unit for a `llmos` account with a venv in /opt/llmos."""
    return Unit(exec_start=["/opt/llmos/.venv/bin/llmosd"], home=Path("/var/lib/llmos"), run_as="llmos").text()
