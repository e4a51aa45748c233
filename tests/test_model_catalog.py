"""The model registry (issue 13): llmos.models.catalog on real files and a real SQLite file,
`llmos models` through click's CliRunner, and parse_model_spec resolving registered names.
Models are the tiny random ones of conftest.py; the one real GGUF is smollm2's, and it
shares the copy conftest's smollm2_dir converted once per machine in LLMOS_MODEL_CACHE."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import fake_kernel
from fake_kernel import io_stack
from llmos.cli import main as cli_main
from llmos.models import catalog as cat
from llmos.models import convert
from llmos.models.catalog import BadModel, Catalog, ModelExists, UnknownModel
from llmos.models.names import model_name
from llmos.models.registry import ModelSource, _smollm2, parse_model_spec
from llmos.paths import Paths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def paths(tmp_path) -> Paths:
    return Paths.from_env(tmp_path / "home")


@pytest.fixture
def fake_convert(tmp_path, monkeypatch) -> list[str]:
    """GGUFs convert into a private cache, by a stand-in for the 25 s dequantization that
    writes a small config.json; returns the files it was asked to convert."""
    monkeypatch.setenv("LLMOS_MODEL_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(directory, gguf_file, out, progress=None):
        calls.append(gguf_file)
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "n_positions": 64}))
    monkeypatch.setattr(convert, "convert_gguf", fake)
    return calls


def gguf(path: Path, payload: bytes) -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


def llmos(paths: Paths, *args: str):
    return CliRunner().invoke(cli_main.cli, ["--home", str(paths.home), *args])


def table(output: str) -> dict[str, list[str]]:
    """A plain-text table's rows by their first cell (the header row included)."""
    return {line.split()[0]: line.split() for line in output.splitlines() if line.strip()}


def fields(output: str) -> dict[str, str]:
    """The `key: value` lines of `llmos models show`."""
    return {k: v.strip() for k, sep, v in (line.partition(":") for line in output.splitlines()) if sep}


def parameters(directory: Path) -> int:
    with safe_open(str(directory / "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def test_add_list_show_cp_rm(paths, tiny_llama_dir):
    r = llmos(paths, "models", "add", "tiny", str(tiny_llama_dir), "--note", "first try")
    assert r.exit_code == 0 and "added tiny v1" in r.output, r.output
    r = llmos(paths, "models")
    assert r.exit_code == 0, r.output
    rows = table(r.output)
    assert rows["NAME"] == ["NAME", "VERSION", "FORMAT", "SIZE", "CONTEXT", "STATE"]
    assert rows["tiny"][:3] == ["tiny", "v1", "hf"] and rows["tiny"][-2:] == ["2048", "unloaded"]
    assert rows["smollm2"][-1] == "unloaded"   # the built-in is always there
    assert llmos(paths, "models", "list").output == r.output

    r = llmos(paths, "models", "show", "tiny")
    assert r.exit_code == 0, r.output
    info = fields(r.output)
    assert info["architecture"] == "LlamaForCausalLM (llama)" and info["dtype"] == "float32"
    assert f"({parameters(tiny_llama_dir):,})" in info["parameters"] and info["context length"] == "2048"
    assert str(tiny_llama_dir) in info["size on disk"] and info["state"] == "unloaded"
    assert table(r.output)["v1"][1:3] == ["*", "hf"] and "  added  v1       first try" in r.output

    r = llmos(paths, "models", "cp", "tiny", "tiny2")
    assert r.exit_code == 0 and "copied tiny v1 to tiny2" in r.output, r.output
    catalog = Catalog(paths)
    assert catalog.get("tiny2").current.prepared == catalog.get("tiny").current.prepared
    assert fields(llmos(paths, "models", "show", "tiny2").output)["parameters"] == info["parameters"]
    r = llmos(paths, "models", "rm", "tiny2")
    assert r.exit_code == 0 and "removed tiny2" in r.output, r.output
    assert "tiny2" not in table(llmos(paths, "models").output)
    assert (tiny_llama_dir / "config.json").is_file()   # an HF directory is used in place, never freed
    assert "(built in)" in llmos(paths, "models", "show", "smollm2").output


def test_facts_are_read_without_torch(tiny_qwen2_dir):
    """The kernel may import the registry: reading a model's facts must not pull torch in."""
    code = textwrap.dedent(f"""
        import dataclasses, json, sys
        import llmos.cli.models, llmos.models.catalog, llmos.models.registry
        from llmos.models.facts import read_facts
        facts = read_facts({str(tiny_qwen2_dir)!r})
        print(json.dumps([dataclasses.asdict(facts), [m for m in ("torch", "transformers") if m in sys.modules]]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    facts, heavy = json.loads(out.stdout)
    assert heavy == []
    assert facts["architecture"] == "Qwen2ForCausalLM" and facts["model_type"] == "qwen2"
    assert facts["parameters"] == parameters(tiny_qwen2_dir) and facts["dtype"] == "float32"
    assert facts["context_length"] == 2048 and facts["size_bytes"] > (tiny_qwen2_dir / "model.safetensors").stat().st_size


def test_versions_history_and_defaults(paths, tiny_llama_dir, tiny_qwen2_dir):
    catalog = Catalog(paths)
    entry = catalog.add("m", tiny_llama_dir)
    assert (entry.active, entry.keep_alive_s, entry.replicas, entry.builtin) == (1, None, 1, False)
    assert catalog.add_version("m", tiny_qwen2_dir, note="try qwen2") == 2
    assert catalog.get("m").current.source == str(tiny_qwen2_dir)
    assert catalog.add_version("m", tiny_llama_dir, note="staged", activate=False) == 3
    assert catalog.get("m").active == 2
    catalog.set_active("m", 1, reason="qwen2 answers worse")
    catalog.set_active("m", 3, reason="staged one is good")
    history = catalog.history("m")
    assert [(e.kind, e.version) for e in history] == [
        (cat.ADDED, 1), (cat.VERSION_ADDED, 2), (cat.UPGRADED, 2), (cat.VERSION_ADDED, 3),
        (cat.ROLLED_BACK, 1), (cat.UPGRADED, 3)]
    assert history[4].reason == "qwen2 answers worse" and history[0].at <= history[-1].at
    with pytest.raises(UnknownModel):
        catalog.set_active("m", 9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.get("m").active = 2

    entry = catalog.set_defaults("m", keep_alive_s=300, replicas=2)
    assert (entry.keep_alive_s, entry.replicas) == (300, 2)
    assert catalog.set_defaults("m", keep_alive_s=None).keep_alive_s is None and catalog.get("m").replicas == 2
    for bad in ({"replicas": 0}, {"replicas": 1.5}, {"keep_alive_s": -1}, {"keep_alive_s": float("inf")}):
        with pytest.raises(BadModel):
            catalog.set_defaults("m", **bad)
    assert catalog.history("m")[-1].kind == cat.DEFAULTS

    # The built-in keeps defaults without becoming a model with versions of its own.
    assert catalog.set_defaults("smollm2", replicas=3).replicas == 3
    smollm2 = catalog.get("smollm2")
    assert smollm2.builtin and smollm2.replicas == 3 and [v.number for v in smollm2.versions] == [1]
    assert [e.name for e in catalog.list()] == ["m", "smollm2"]
    with pytest.raises(BadModel, match="built in"):
        catalog.add_version("smollm2", tiny_llama_dir)
    with pytest.raises(BadModel, match="built in"):
        catalog.remove("smollm2")

    # cp takes the active version and the defaults; rm keeps the history.
    copy = catalog.copy("m", "m2")
    assert copy.current.source == str(tiny_llama_dir) and copy.replicas == 2 and len(copy.versions) == 1
    catalog.remove("m")
    with pytest.raises(UnknownModel):
        catalog.get("m")
    assert catalog.history("m")[-1].kind == cat.REMOVED and catalog.get("m2").active == 1


def test_the_registry_is_durable_sqlite_in_wal_mode(paths, tiny_llama_dir):
    Catalog(paths).add("keep", tiny_llama_dir, note="n")
    again = Catalog(paths)   # another instance, as another process would have
    assert again.get("keep") == Catalog(paths).get("keep") and again.get("keep").current.note == "n"
    with sqlite3.connect(cat.db_path(paths)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT name, number, kind FROM versions").fetchall() == [("keep", 1, "hf")]


def test_concurrent_writers_queue_and_lose_nothing(paths, tiny_llama_dir, tiny_qwen2_dir):
    """Three processes (as the CLI and the daemon would be) add models and versions of one
    model at once: every write lands, version numbers are unique and dense."""
    Catalog(paths).add("shared", tiny_llama_dir)
    code = textwrap.dedent(f"""
        import sys
        from llmos.models.catalog import Catalog
        from llmos.paths import Paths
        i, catalog = sys.argv[1], Catalog(Paths.from_env({str(paths.home)!r}))
        catalog.add("w" + i, {str(tiny_qwen2_dir)!r})
        for k in range(10):
            catalog.add_version("shared", {str(tiny_qwen2_dir)!r}, note=f"w{{i}}-{{k}}")
            catalog.set_defaults("w" + i, replicas=k + 1)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    catalog = Catalog(paths)
    shared = catalog.get("shared")
    assert [v.number for v in shared.versions] == list(range(1, 32)) and shared.active == 31
    assert {v.note for v in shared.versions[1:]} == {f"w{i}-{k}" for i in range(3) for k in range(10)}
    assert [catalog.get(f"w{i}").replicas for i in range(3)] == [10, 10, 10]
    kinds = [e.kind for e in catalog.history("shared")]
    assert kinds.count(cat.VERSION_ADDED) == 30 and kinds.count(cat.UPGRADED) == 30


def test_parse_model_spec_resolves_registered_names(paths, tmp_path, monkeypatch, tiny_llama_dir, tiny_qwen2_dir):
    monkeypatch.setenv("LLMOS_HOME", str(paths.home))
    with pytest.raises(UnknownModel):
        parse_model_spec("mine")
    assert not cat.db_path(paths).exists()   # resolving a spec never creates a registry
    catalog = Catalog(paths)
    catalog.add("mine", tiny_llama_dir)
    assert parse_model_spec("mine") == ModelSource("mine", tiny_llama_dir, None) == parse_model_spec(" mine ")
    catalog.add_version("mine", tiny_qwen2_dir)
    assert parse_model_spec("mine").path == tiny_qwen2_dir   # the active version
    catalog.set_active("mine", 1)
    assert parse_model_spec("mine", Paths.from_env(paths.home)).path == tiny_llama_dir
    assert model_name("mine") == parse_model_spec("mine").name
    # Every other spec form still works; a bare word is a registered name before a path.
    assert parse_model_spec("smollm2").gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert parse_model_spec(f"x={tiny_qwen2_dir}") == ModelSource("x", tiny_qwen2_dir, None)
    assert parse_model_spec(str(tiny_qwen2_dir)).name == tiny_qwen2_dir.name == model_name(str(tiny_qwen2_dir))
    (tmp_path / "mine").symlink_to(tiny_qwen2_dir)
    monkeypatch.chdir(tmp_path)
    assert parse_model_spec("mine").path == tiny_llama_dir and parse_model_spec("./mine").path == tiny_qwen2_dir
    # A registered version whose directory is gone says so instead of failing to load later.
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "config.json").write_text("{}")
    catalog.add("ghost", gone)
    (gone / "config.json").unlink()
    with pytest.raises(UnknownModel, match="is gone"):
        parse_model_spec("ghost")


def test_gguf_add_shares_smollm2s_converted_copy(paths, smollm2_dir, monkeypatch):
    """smollm2's GGUF added under another name is not converted again: conversions are named
    by content, and this content is the built-in's, converted once per machine."""
    def no_conversion(*args, **kw):
        pytest.fail("the smollm2 GGUF was converted a second time")
    monkeypatch.setattr(convert, "convert_gguf", no_conversion)
    src = _smollm2()
    r = llmos(paths, "models", "add", "mysmol", str(src.path / src.gguf_file))
    assert r.exit_code == 0 and "added mysmol v1 (gguf" in r.output, r.output
    v = Catalog(paths).get("mysmol").current
    assert (v.kind, Path(v.prepared), Path(v.source)) == ("gguf", smollm2_dir, src.path / src.gguf_file)
    info = fields(llmos(paths, "models", "show", "mysmol").output)
    assert info["architecture"] == "LlamaForCausalLM (llama)" and info["context length"] == "8192"
    assert f"({parameters(smollm2_dir):,})" in info["parameters"]
    assert parse_model_spec("mysmol", paths) == ModelSource("mysmol", smollm2_dir, None)
    assert llmos(paths, "models", "rm", "mysmol").exit_code == 0
    assert (smollm2_dir / "config.json").is_file()   # the built-in's copy is never freed


def test_gguf_conversions_are_shared_and_freed_with_their_last_name(paths, fake_convert, tmp_path):
    a = gguf(tmp_path / "a.gguf", b"one")
    catalog = Catalog(paths)
    prepared = Path(catalog.add("a", a).current.prepared)
    assert fake_convert == ["a.gguf"] and prepared.parent == tmp_path / "cache"
    catalog.copy("a", "b")
    same = gguf(tmp_path / "same.gguf", b"one")   # same bytes at another path
    assert Path(catalog.add("c", same).current.prepared) == prepared and fake_convert == ["a.gguf"]
    assert catalog.remove("a") == [] and catalog.remove("b") == [] and prepared.is_dir()
    assert catalog.remove("c") == [prepared] and not prepared.exists()
    catalog.add("a", a)
    assert fake_convert == ["a.gguf", "a.gguf"]   # freed, so converted again
    catalog.add_version("a", gguf(tmp_path / "two.gguf", b"two"))
    dirs = {Path(v.prepared) for v in catalog.get("a").versions}
    assert len(dirs) == 2 and catalog.remove("a") == sorted(dirs)
    assert not any(d.exists() for d in dirs)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_prepared_model_dir_answers_only_once_the_files_are_there(paths, tmp_path, tiny_llama_dir):
    """What the kernel asks before it starts a tokenizer beside its model driver: the
    directory prepare_model_dir would return, without converting anything."""
    from llmos.models.registry import prepare_model_dir, prepared_model_dir

    assert prepared_model_dir(str(tiny_llama_dir), tmp_path / "models", paths) == tiny_llama_dir
    raw = gguf(tmp_path / "raw.gguf", b"not converted yet")
    assert prepared_model_dir(str(raw), tmp_path / "models", paths) is None
    assert not (tmp_path / "models").exists()          # asking converted nothing
    out = tmp_path / "models" / "raw"
    out.mkdir(parents=True)
    assert prepared_model_dir(str(raw), tmp_path / "models", paths) is None   # half there: no config.json
    (out / "config.json").write_text("{}")
    assert prepared_model_dir(str(raw), tmp_path / "models", paths) == out
    assert prepare_model_dir(str(raw), tmp_path / "models") == out          # the same answer
    assert prepared_model_dir("no-such-model", tmp_path / "models", paths) is None


def test_a_gguf_that_fails_to_convert_leaves_nothing(paths, tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("LLMOS_MODEL_CACHE", str(tmp_path / "cache"))
    junk = gguf(tmp_path / "junk.gguf", bytes(range(256)) * 4)   # the magic, then garbage
    r = llmos(paths, "models", "add", "broken", str(junk))       # the real converter
    assert r.exit_code == 1 and r.output.startswith("Error: cannot convert") and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    catalog = Catalog(paths)
    assert not catalog.exists("broken")
    with pytest.raises(UnknownModel):
        catalog.history("broken")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    catalog.add("tiny", tiny_llama_dir)
    with pytest.raises(BadModel, match="cannot convert"):
        catalog.add_version("tiny", junk)
    assert [v.number for v in catalog.get("tiny").versions] == [1]


def test_bad_input_is_one_line_and_changes_nothing(paths, tmp_path, tiny_llama_dir):
    assert llmos(paths, "models", "add", "tiny", str(tiny_llama_dir)).exit_code == 0
    empty, text, bad_config = tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "badcfg"
    empty.mkdir()
    bad_config.mkdir()
    text.write_text("hi")
    (bad_config / "config.json").write_text("{")
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04")
    cases = [
        (["add", "tiny", str(tiny_llama_dir)], "model 'tiny' already exists"),
        (["add", "smollm2", str(tiny_llama_dir)], "model 'smollm2' already exists"),
        (["add", "bad name", str(tiny_llama_dir)], "model name 'bad name'"),
        (["add", "a/b", str(tiny_llama_dir)], "model name 'a/b'"),
        (["add", "x.gguf", str(tiny_llama_dir)], "may not end in .gguf"),
        (["add", "x", str(tmp_path / "nope")], "does not exist"),
        (["add", "x", str(empty)], "neither a .gguf file nor a directory with config.json"),
        (["add", "x", str(text)], "neither a .gguf file nor a directory with config.json"),
        (["add", "x", str(not_gguf)], "not a GGUF file"),
        (["add", "x", str(bad_config)], "not a usable model directory"),
        (["show", "nope"], "model 'nope' is not registered"),
        (["rm", "nope"], "model 'nope' is not registered"),
        (["rm", "smollm2"], "built in and cannot be removed"),
        (["cp", "nope", "y"], "model 'nope' is not registered"),
        (["cp", "tiny", "smollm2"], "model 'smollm2' already exists"),
        (["cp", "tiny", "bad name"], "model name 'bad name'"),
    ]
    for args, message in cases:
        r = llmos(paths, "models", *args)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error: "), (args, r.output)
    assert [e.name for e in Catalog(paths).list()] == ["smollm2", "tiny"]
    assert [e.kind for e in Catalog(paths).history("tiny")] == [cat.ADDED]


def test_state_comes_from_the_daemon_and_rm_waits_for_force(paths, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(fake_kernel, "MODEL", "tiny")   # the fake daemon serves "tiny"
    assert llmos(paths, "models", "add", "tiny", str(tiny_llama_dir)).exit_code == 0
    with io_stack(paths.home):
        rows = table(llmos(paths, "models").output)
        assert rows["tiny"][-1] == "loaded" and rows["smollm2"][-1] == "unloaded"
        assert fields(llmos(paths, "models", "show", "tiny").output)["state"] == "loaded"
        r = llmos(paths, "models", "rm", "tiny")
        assert r.exit_code == 1 and "llmosd is serving 'tiny'" in r.output and Catalog(paths).exists("tiny")
        r = llmos(paths, "models", "rm", "tiny", "--force")
        assert r.exit_code == 0 and not Catalog(paths).exists("tiny")
        rows = table(llmos(paths, "models").output)   # served but no longer registered: still listed
        assert rows["tiny"] == ["tiny", "-", "-", "-", "2048", "loaded"]


def test_tensor_progress_reports_the_dequantization_loop():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    original, seen = gguf_utils.tqdm, []
    with convert._tensor_progress(lambda *report: seen.append(report)):
        assert list(gguf_utils.tqdm(["t0", "t1"], desc="Converting")) == ["t0", "t1"]
    assert seen == [("dequantizing", 0, 2), ("dequantizing", 1, 2), ("dequantizing", 2, 2)]
    assert gguf_utils.tqdm is original
