"""The config file (llmos/config_file.py): parsing, checks that name the line, flags over the
file, tenants and alert rules from it, `llmos config show`, and llmosd refusing a bad file."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmos import config_file
from llmos.cli.config_cmd import to_toml
from llmos.cli.daemon import main as llmosd, resolve
from llmos.cli.main import cli
from llmos.config import DaemonConfig
from llmos.config_file import OPTIONS, ConfigError
from llmos.config_lines import line_of
from llmos.kernel.tenants import DEFAULT_TENANT, TenantConfig
from llmos.paths import Paths

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def write(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(text)
    return path


def daemon_config(home: Path, *flags: str) -> DaemonConfig:
    """What llmosd would run with (without running it): its own option parsing and checks."""
    ctx = llmosd.make_context("llmosd", ["--home", str(home), *flags])
    return resolve(ctx, Paths.from_env(home))[1]


def error_of(home: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_file.load(write(home, text))
    return info.value


def test_every_flag_of_llmosd_is_a_key_of_the_file_and_the_defaults_agree():
    params = {p.name: p for p in llmosd.params}
    keys = set(params) - {"home", "config_path", "tenant_specs"}
    assert keys == set(OPTIONS)
    for key in keys - {"replica_devices"}:   # (the flag takes a comma list; the file a TOML list)
        default = params[key].default
        assert (list(default) if key == "models" else default) == OPTIONS[key].default, key


def test_a_file_that_sets_every_option_reaches_every_daemon_config_field(tmp_path):
    home = tmp_path / "home"
    write(home, """
models = ["smollm2"]
dtype = "bfloat16"
device = "cpu"
kv_memory = 67108864
block_size = 32
max_num_seqs = 4
max_batched_tokens = 256
max_model_len = 512
drain_timeout = 5
first_answer_timeout = 60
prefix_caching = false
swap_memory = "0"
preemption_mode = "recompute"
scheduler = "priority"
request_timeout = 30
queue_timeout = 10
max_restarts = 2
keep_alive = "10m"
max_loaded_models = 2
replicas = 1
replica_devices = ["cpu"]
allow_local_users = true
socket_mode = 660
socket_group = "0"
listen = "127.0.0.1:8123"
tls_cert = "/etc/cert.pem"
tls_key = "/etc/key.pem"
audit_key_file = "/etc/audit.key"
audit_record_prompts = true
job_retention_days = 7
memory_limit = "8GiB"
kv_events_endpoint = "tcp://127.0.0.1:5557"
kv_events_pod = "pod-a"
kv_events_hash_seed = "42"
log_level = "warning"

[tenants.alice]
weight = 3
max_concurrent = 8
tokens_per_minute = "none"

[alerts]
command = "/usr/bin/true"
webhook = "http://127.0.0.1:9/alerts"

[[alerts.rules]]
name = "KVCacheFull"
threshold = 0.9
""")
    c = daemon_config(home)
    defaults = DaemonConfig()
    same_as_default = {f.name for f in dataclasses.fields(DaemonConfig)
                       if getattr(c, f.name) == getattr(defaults, f.name)}
    assert same_as_default == {"models", "scheduler", "replicas", "cli_overrides"}   # set to their defaults
    assert (c.kv_memory, c.socket_mode, c.keep_alive_s, c.memory_limit_bytes) == ("67108864", "660", 600.0, 8 << 30)
    assert (c.request_timeout_s, c.queue_timeout_s, c.replica_devices) == (30.0, 10.0, ["cpu"])
    assert c.tenants == {"alice": TenantConfig(weight=3.0, max_concurrent=8)}
    assert c.alert_rules == [{"name": "KVCacheFull", "threshold": 0.9}]
    assert (c.alert_command, c.alert_webhook) == ("/usr/bin/true", "http://127.0.0.1:9/alerts")
    assert c.effective["log_level"] == "WARNING" and c.config_file == str(home / "config.toml")


def test_flags_given_override_the_file_and_defaults_never_do(tmp_path):
    home = tmp_path / "home"
    write(home, 'dtype = "bfloat16"\nkv_memory = "64MiB"\nmax_num_seqs = 4\n')
    c = daemon_config(home, "--kv-memory", "128MiB", "--max-batched-tokens", "1024")
    assert (c.dtype, c.kv_memory, c.max_num_seqs) == ("bfloat16", "128MiB", 4)   # a default --dtype is not given
    assert c.cli_overrides == {"kv_memory": "128MiB", "max_batched_tokens": 1024}   # given, even at its default
    assert daemon_config(home, "--dtype", "float32").dtype == "float32"


def test_tenants_from_the_file_and_a_flag_replacing_one_whole(tmp_path):
    home = tmp_path / "home"
    write(home, """
[tenants.alice]
weight = 2
max_concurrent = 4

[tenants."*"]
max_queued = 8

[tenants.bob]
default_priority = "batch"
""")
    c = daemon_config(home, "--tenant", "alice:weight=5")
    assert c.tenants["alice"] == TenantConfig(weight=5.0)   # the flag's alice, not merged with the file's
    assert c.tenants["*"] == dataclasses.replace(DEFAULT_TENANT, max_queued=8)   # '*' keeps the default bounds
    assert c.tenants["bob"] == TenantConfig(default_priority="batch")


@pytest.mark.parametrize("text, line, says", [
    ('dtype = "float32"\nkv_memroy = "1GiB"\n', 2, "unknown key 'kv_memroy'; did you mean 'kv_memory'?"),
    ('\n\nmax_num_seqs = "many"\n', 3, "max_num_seqs must be an integer, not a string"),
    ('prefix_caching = 1\n', 1, "prefix_caching must be true or false, not an integer"),
    ('dtype = "float16"\n', 1, "dtype must be one of float32, bfloat16, int4, int8, not 'float16'"),
    ('replicas = 65\n', 1, "replicas must be from 1 to 64"),
    ('# ok\n[tenants.alice]\nweight = 1\n\n[tenants.bob]\nmax_queud = 3\n', 6,
     "unknown tenant 'bob' setting 'max_queud'; did you mean 'max_queued'?"),
    ('[tenants.bob]\nweight = 0\n', 2, "tenant 'bob': tenant weight must be a finite number > 0"),
    ('[tenants.bob]\nmax_concurrent = -1\n', 2, "max_concurrent must be an integer >= 0"),
    ('[tenants.bob]\nmax_concurrent = 1.5\n', 2, 'max_concurrent must be an integer or "none", not a float'),
    ('[tenants.bob]\ndefault_priority = "urgent"\n', 2, "default_priority must be one of"),
    ('tenants = 3\n', 1, "tenants must be tables"),
    ('dtype = "float32"\nmodels = [\n', 2, "not valid TOML"),
    ('dtype = float32\n', 1, "not valid TOML: Invalid value"),
    ('[alerts]\ncommnd = "x"\n', 2, "unknown alerts key 'commnd'; did you mean 'command'?"),
    ('[alerts]\nwebhook = "ftp://x"\n', 2, "alerts.alert_webhook: 'ftp://x' is not an http or https URL"),
    ('[[alerts.rules]]\nname = "A"\nmetric = "llmos_steps_total"\nop = ">"\nthreshold = 1\n\n'
     '[[alerts.rules]]\nname = "B"\nmetric = "llmos_steps_total"\nfn = "rate"\nop = ">"\nthreshold = 1\n'
     'window = "1x"\n', 13,
     "alert rule 'B': window: '1x' is not a duration"),
    ('[[alerts.rules]]\nname = "A"\nmetric = "llmos_steps_total"\n', 1, "alert rule 'A': op:"),   # (unset: its table)
])
def test_a_bad_file_is_an_error_naming_the_file_and_the_line(tmp_path, text, line, says):
    err = error_of(tmp_path, text)
    assert err.line == line and says in err.message, str(err)
    assert str(err).startswith(f"{tmp_path / 'config.toml'}:{line}: ")


def test_line_of_finds_keys_under_headers_dotted_and_quoted_names_and_the_nth_array_table():
    text = ('a = 1\n[tenants."team.x"]  # a name with a dot\nweight = 2\n[tenants]\nbob.weight = 3\n'
            '[[alerts.rules]]\nname = "A"\n[[alerts.rules]]\nname = "B"\nfor = "1m"\n')
    assert line_of(text, ("a",)) == 1
    assert line_of(text, ("tenants", "team.x", "weight")) == 3
    assert line_of(text, ("tenants", "bob", "weight")) == 5
    assert line_of(text, ("alerts", "rules", "name"), nth=1) == 9
    assert line_of(text, ("alerts", "rules", "window"), nth=1) == 8   # not set: the rule's own table
    assert line_of(text, ("nowhere",)) is None


def test_an_explicit_config_must_exist_the_default_one_need_not(tmp_path):
    assert daemon_config(tmp_path / "home").config_file == str(tmp_path / "home" / "config.toml")
    with pytest.raises(ConfigError, match="no such file"):
        daemon_config(tmp_path / "home", "--config", str(tmp_path / "missing.toml"))


@pytest.mark.parametrize("text, line, says", [
    ('kv_memory = "lots"\n', 1, "kv_memory: 'lots'"),
    ('\nmodels = ["nosuchmodel"]\n', 2, "models: model 'nosuchmodel'"),
    ('socket_mode = "999"\n', 1, "socket_mode: '999': give octal"),
])
def test_llmosd_refuses_a_bad_file_at_once_with_its_line(tmp_path, text, line, says):
    """Checks that need llmosd's own (a model spec, a size) name the file's line too; exit 2."""
    path = write(tmp_path / "home", text)
    r = subprocess.run([sys.executable, "-m", "llmos.cli.daemon", "--home", str(tmp_path / "home")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{path}:{line}: {says}" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_config_show_prints_the_effective_config_as_toml_that_reads_back_the_same(tmp_path):
    home = tmp_path / "home"
    write(home, 'dtype = "bfloat16"\nsocket_group = "team \\"a\\"\\t"\n[tenants."*"]\nmax_queued = "none"\n'
                '[[alerts.rules]]\nname = "KVCacheFull"\nwhere = { model = ["a", "b*"] }\n')
    r = CliRunner().invoke(cli, ["config", "show", "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert "dtype = \"bfloat16\"" in r.output and "# max_model_len: not set" in r.output
    shown = tomllib.loads(r.output)
    expected = config_file.effective(config_file.load(home / "config.toml"), {})
    assert shown == {k: v for k, v in expected.items() if v is not None}
    r = CliRunner().invoke(cli, ["--home", str(home), "config", "show", "--json"])
    data = json.loads(r.output)
    assert data["config_file"] == str(home / "config.toml") and data["tenants"] == {"*": {"max_queued": "none"}}
    assert data["max_model_len"] is None and data["kv_memory"] == "1GiB"


def test_config_show_names_the_line_of_a_bad_file(tmp_path):
    path = write(tmp_path, "block_size = 0\n")
    r = CliRunner().invoke(cli, ["config", "show", "--config", str(path)])
    assert r.exit_code == 1 and f"{path}:1: block_size must be >= 1, not 0" in r.output


def test_the_example_in_docs_config_md_is_a_valid_file_naming_every_option(tmp_path):
    example = EXAMPLE.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    file = config_file.load(write(tmp_path, example))
    assert set(file.tenants) == {"alice", "batch-team", "*"} and len(file.alerts["rules"]) == 2
    named = {line.lstrip("# ").split(" = ")[0] for line in example.splitlines() if " = " in line}
    assert set(OPTIONS) <= named   # set, or shown as a comment when its default is "unset"
    merged = config_file.effective(file, {})
    assert tomllib.loads(to_toml(merged)) == {k: v for k, v in merged.items() if v is not None}
