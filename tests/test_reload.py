"""SIGHUP re-reads the config file (llmos/kernel/reload.py): tenants, quotas, alert rules and the
log level change while the daemon serves; anything else is reported as needing a restart; a
broken file changes nothing. First against the real engine's tenant books in-process, then on
a real daemon."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon_harness import Daemon, wait_for
from llmos.cli.daemon import main as llmosd, resolve
from llmos.kernel.engine import make_policy
from llmos.kernel.reload import reload_config
from llmos.kernel.tenants import TenantConfig
from llmos.paths import Paths


def started(home: Path, text: str, *flags: str):
    """A stand-in kernel: llmosd's own config for `text` and `flags`, one engine whose
    scheduler holds the priority policy that config makes."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)
    config = resolve(llmosd.make_context("llmosd", ["--home", str(home), *flags]), Paths.from_env(home))[1]
    engine = SimpleNamespace(scheduler=SimpleNamespace(policy=make_policy(config)))
    return SimpleNamespace(config=config, engines={"m": engine}), engine.scheduler.policy.tenants


class FakeAlerts:
    def __init__(self):
        self.given = []

    def set_rules(self, rules):
        if rules and rules[0].get("threshold") == -1:
            raise ValueError("alert rule 'X': threshold: refused")
        self.given.append(rules)


def test_tenants_change_in_the_engines_books_and_in_the_config_later_engines_read(tmp_path):
    kernel, book = started(tmp_path, '[tenants.alice]\nweight = 2\n[tenants.gone]\nmax_concurrent = 1\n')
    book.on_queued("alice")
    book.charge("alice", 10, now=1.0)
    (tmp_path / "config.toml").write_text('[tenants.alice]\nweight = 4\nmax_concurrent = 0\n'
                                          '[tenants."*"]\nmax_queued = 3\n')
    report = reload_config(kernel)
    assert report.error is None and report.applied == ["tenants (*, alice, gone)"] and report.not_applied == {}
    assert book.config("alice") == TenantConfig(weight=4.0, max_concurrent=0)
    assert book.counts("alice") == (1, 0) and book.served("alice") == 10   # the accounting is kept
    assert book.check_admission("alice", 2.0).limit == "max_concurrent"
    assert book.default.max_queued == 3 and book.config("gone") == book.default   # no longer named
    assert kernel.config.tenants["alice"] == TenantConfig(weight=4.0, max_concurrent=0)
    assert make_policy(kernel.config).tenants.config("alice").max_concurrent == 0   # an engine loaded later


def test_what_needs_a_restart_is_reported_and_the_flags_given_still_win(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("LLMOS_LOG_LEVEL", "INFO")   # (the reload sets it; put back after the test)
    level = logging.getLogger().level
    kernel, book = started(tmp_path, 'dtype = "float32"\n', "--kv-memory", "64MiB", "--tenant", "bob:weight=2")
    (tmp_path / "config.toml").write_text('dtype = "bfloat16"\nkv_memory = "8GiB"\nlisten = "127.0.0.1:9"\n'
                                          'log_level = "debug"\n[tenants.bob]\nweight = 9\n')
    with caplog.at_level(logging.INFO, logger="llmos.kernel.reload"):
        report = reload_config(kernel)
    assert report.not_applied == {"dtype": "needs a restart", "listen": "needs a restart"}   # kv_memory: the flag's
    assert report.applied == ["log_level DEBUG (drivers: when they next start)"]   # bob stays the flag's
    assert logging.getLogger().level == logging.DEBUG and os.environ["LLMOS_LOG_LEVEL"] == "DEBUG"
    assert book.config("bob").weight == 2.0 and kernel.config.dtype == "float32"
    assert "dtype changed ('float32' -> 'bfloat16') but needs a restart: not applied" in caplog.text
    assert reload_config(kernel).not_applied.keys() == {"dtype", "listen"}   # still, until a restart
    logging.getLogger().setLevel(level)


def test_a_broken_file_changes_nothing_and_says_where(tmp_path, caplog):
    kernel, book = started(tmp_path, '[tenants.alice]\nmax_concurrent = 5\n')
    for text, says in (('[tenants.alice]\nmax_concurrent = 0\nlog_levl = "DEBUG"\n', ":3: unknown tenant 'alice' setting"),
                       ('[tenants.alice\nmax_concurrent = 0\n', ":1: not valid TOML"),
                       ('[tenants.alice]\nmax_concurrent = -1\n', ":2: tenant 'alice'")):
        (tmp_path / "config.toml").write_text(text)
        caplog.clear()
        report = reload_config(kernel)
        assert says in report.error and f"config reload: {tmp_path / 'config.toml'}{says}" in caplog.text
        assert "nothing changed" in caplog.text and book.config("alice").max_concurrent == 5
    (tmp_path / "config.toml").unlink()
    assert "no such file" in reload_config(kernel).error and book.config("alice").max_concurrent == 5


def test_alert_rules_go_to_the_alert_engine_whole_and_a_refused_set_keeps_the_old(tmp_path):
    kernel, _ = started(tmp_path, "")
    (tmp_path / "config.toml").write_text('[[alerts.rules]]\nname = "KVCacheFull"\nthreshold = 0.5\n')
    assert "alerts.rules" in reload_config(kernel).not_applied   # no alert engine: said so
    kernel.alerts = FakeAlerts()
    assert reload_config(kernel).applied == ["alert rules (1 in the file)"]
    assert kernel.alerts.given == [[{"name": "KVCacheFull", "threshold": 0.5}]]
    (tmp_path / "config.toml").write_text('[[alerts.rules]]\nname = "KVCacheFull"\nthreshold = -1\n'
                                          '[alerts]\nwebhook = "http://127.0.0.1:9/"\n')
    report = reload_config(kernel)
    assert report.not_applied == {"alerts.webhook": "needs a restart",
                                  "alerts.rules": "alert rule 'X': threshold: refused"}
    assert kernel.config.effective["alerts"]["rules"] == [{"name": "KVCacheFull", "threshold": 0.5}]
    (tmp_path / "config.toml").write_text("")
    assert reload_config(kernel).applied == ["alert rules (0 in the file)"] and kernel.alerts.given[-1] is None


# ---------------------------------------------------------------- a real daemon

CONFIG = """\
dtype = "float32"
kv_memory = "1GiB"          # the test's --kv-memory flag wins, before and after
max_num_seqs = 4

[tenants.q]
max_concurrent = 4

[tenants.heavy]
weight = 1
"""


def complete(d: Daemon, tenant: str):
    with d.http() as c:
        return c.post("/v1/completions", json={"model": "tiny", "prompt": "The config says", "max_tokens": 6,
                                               "temperature": 0, "tenant": tenant})


def log_count(d: Daemon, text: str) -> int:
    return (d.home / "llmosd.out").read_text(errors="replace").count(text)


def hup(d: Daemon, reloads: int, errors: int = 0) -> None:
    """SIGHUP, then wait until the kernel has said it reloaded (or refused) that many times."""
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: log_count(d, "config reloaded from") >= reloads and log_count(d, "nothing changed") >= errors,
             120, "the kernel said what the reload did")


@pytest.fixture
def daemon(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG)
    d = Daemon(home, [f"tiny={tiny_llama_dir}"])
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def test_sighup_applies_new_quotas_reports_what_needs_a_restart_and_keeps_serving(daemon):
    d = daemon
    before = complete(d, "other")
    assert before.status_code == 200 and complete(d, "q").status_code == 200
    path = d.home / "config.toml"
    path.write_text(CONFIG.replace('dtype = "float32"', 'dtype = "bfloat16"').replace(
        "max_concurrent = 4", "max_concurrent = 0").replace("weight = 1", "weight = 4"))
    hup(d, reloads=1)
    refused = complete(d, "q")
    assert refused.status_code == 429 and "max_concurrent" in refused.json()["error"]["message"]
    assert d.ps()["scheduler"]["tiny"]["tenants"]["heavy"]["weight"] == 4.0
    out = (d.home / "llmosd.out").read_text(errors="replace")
    assert "dtype changed ('float32' -> 'bfloat16') but needs a restart: not applied" in out
    assert "not applied (restart needed): dtype" in out and "kv_memory changed" not in out
    again = complete(d, "other")   # everyone else is served as before
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]

    path.write_text("[tenants.q\nmax_concurrent = 4\n")   # broken: nothing changes
    hup(d, reloads=1, errors=1)
    assert f"{path}:1: not valid TOML" in (d.home / "llmosd.out").read_text(errors="replace")
    assert complete(d, "q").status_code == 429

    path.write_text(CONFIG)   # q back to 4 in flight
    hup(d, reloads=2)
    assert complete(d, "q").status_code == 200 and d.proc.poll() is None
