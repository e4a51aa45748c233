"""The systemd side without a daemon: sd_notify datagrams to a socket the test binds (a path
and an abstract name), the watchdog's interval, the notifier's readiness rule on a scripted
health, and `llmos service install` writing a unit that systemd-analyze accepts."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from llmos.cli.main import cli
from llmos.service import notify as sd
from llmos.service.unit import example

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    yield sock, str(tmp_path / "notify.sock")
    sock.close()


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_name(listener, monkeypatch):
    sock, path = listener
    assert sd.notify("READY=1\nSTATUS=serving", path)
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    name = f"llmos-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.notify("WATCHDOG=1")
        assert abstract.recv(4096) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd.notify("READY=1")                            # not under systemd: nothing to do
    assert not sd.notify("READY=1", path + ".gone")            # a socket that went away is not our failure


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us():
    assert sd.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert sd.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert sd.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert sd.watchdog_interval({}) is None and sd.watchdog_interval({"WATCHDOG_USEC": "x"}) is None


def _report(status: str, **kw):
    return SimpleNamespace(status=status, models={"tiny": "ready"}, failed_drivers=kw.get("failed", []),
                           dead_loops={})


def test_ready_is_sent_once_the_health_is_ok_and_only_then(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    health = iter([_report("starting"), _report("starting"), _report("ok"), _report("ok"),
                   _report("degraded", failed=["model-tiny"])])
    notifier = sd.ServiceNotifier(lambda: next(health))
    assert "NOTIFY_SOCKET" not in os.environ   # the drivers it starts next do not get it
    got = []
    for _ in range(5):
        notifier.check()
        sock.setblocking(False)
        try:
            while True:
                got.append(sock.recv(4096).decode())
        except BlockingIOError:
            got.append("|")
    assert got == ["STATUS=starting", "|", "|", "READY=1\nSTATUS=serving: tiny", "|", "|",
                   "STATUS=degraded: model-tiny", "|"]
    sock.setblocking(True)
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_the_loop_sends_watchdog_pings(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    notifier = sd.ServiceNotifier(lambda: _report("ok"))

    async def a_while():
        task = asyncio.ensure_future(notifier.run())
        got = []
        while got.count("WATCHDOG=1") < 3:
            got.append(await asyncio.get_running_loop().run_in_executor(None, lambda: sock.recv(4096).decode()))
        task.cancel()
        return got
    got = asyncio.run(asyncio.wait_for(a_while(), 30))
    assert got[0].startswith("READY=1") or got[1].startswith("READY=1")


def test_without_notify_socket_the_loop_just_waits(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = sd.ServiceNotifier(lambda: pytest.fail("no health check without systemd"))

    async def briefly():
        task = asyncio.ensure_future(notifier.run())
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
    asyncio.run(briefly())


def test_scripts_unit_is_the_rendered_example():
    assert (REPO / "scripts" / "llmosd.service").read_text() == example()


def _verify(unit: Path, user: bool, tmp_path: Path) -> None:
    """systemd-analyze verify, where it exists: exit 0 and not one warning about the unit."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    if r.returncode != 0 and "Failed to initialize manager" in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()}")
    assert r.returncode == 0 and unit.name not in r.stderr and "Unknown key" not in r.stderr, r.stderr


def test_install_user_writes_a_unit_systemd_accepts(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("LLMOS_HOME", raising=False)
    r = CliRunner().invoke(cli, ["service", "install", "--user"])
    assert r.exit_code == 0, r.output
    unit = tmp_path / ".config" / "systemd" / "user" / "llmosd.service"
    text = unit.read_text()
    home = tmp_path / ".llmos"
    assert f"--home {home}" in text and "Type=notify" in text and "NotifyAccess=main" in text
    assert "User=" not in text and "WantedBy=default.target" in text
    assert "systemctl --user enable --now llmosd" in r.output
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert Path(exec_start.split("=", 1)[1].split()[0]).exists()   # this installation's llmosd
    assert home.is_dir()   # ReadWritePaths and the daemon need it
    _verify(unit, True, tmp_path)


def test_install_system_dry_run_writes_nothing_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["service", "install", "--dry-run", "--home", str(tmp_path / "state"),
                                 "--run-as", "root"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("# would write /etc/systemd/system/llmosd.service\n")
    assert not (tmp_path / "state").exists()
    text = r.output.split("\n", 1)[1]
    assert f"ReadWritePaths={tmp_path / 'state'} {os.environ['LLMOS_MODEL_CACHE']}" in text   # (conftest's cache)
    for line in ("ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes", "NoNewPrivileges=yes", "RuntimeDirectory=llmos", "KillMode=mixed",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=root"):
        assert line in text.splitlines(), line
    (tmp_path / "state").mkdir()
    out = tmp_path / "unit" / "llmosd.service"
    r = CliRunner().invoke(cli, ["service", "install", "--unit-dir", str(out.parent), "--home", str(tmp_path / "state"),
                                 "--run-as", "root"])
    assert r.exit_code == 0 and out.read_text() == text
    _verify(out, False, tmp_path)
