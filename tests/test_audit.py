"""The audit log (issue 14): the chain, the tamper test, rotation, torn tails, concurrency,
redaction and the `llmos audit` commands, all on real files in a temporary directory.
Nothing here waits for the background fsync: close() syncs and writes the anchor."""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import threading

import pytest
from click.testing import CliRunner

from llmos.audit import AuditError, AuditLog, GENESIS, verify
from llmos.audit.chain import canonical, record_hash, seal
from llmos.cli import audit as audit_cli

KEY = b"k" * 32
FIRST = "audit-000001.jsonl"


def make_log(d, n=8, key=KEY, **kw):
    with AuditLog(d, hmac_key=key, **kw) as log:
        for i in range(n):
            log.record("model.load", principal="local", model=f"m{i}", status="loaded", note="café")
    return d / FIRST


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def bad_at(d, key=KEY):
    res = verify(d, key)
    assert not res.ok
    return res.bad


def test_records_chain_as_specified(tmp_path):
    d = tmp_path / "audit"
    with AuditLog(d, hmac_key=KEY) as log:
        rec = log.record("admin", principal="local", action="restart", target="tokenizer")
    stored = [json.loads(x) for x in lines(d / FIRST)]
    assert [r["kind"] for r in stored] == ["audit.file", "admin"] and stored[1] == rec
    prev = GENESIS
    for r in stored:
        body = {k: v for k, v in r.items() if k not in ("hash", "mac")}
        assert r["prev"] == prev
        assert r["hash"] == hashlib.sha256(bytes.fromhex(prev) + canonical(body)).hexdigest()
        assert r["mac"] == hmac.new(KEY, bytes.fromhex(r["hash"]), hashlib.sha256).hexdigest()
        prev = r["hash"]
    assert [r["seq"] for r in stored] == [1, 2]
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert {os.stat(p).st_mode & 0o777 for p in d.iterdir()} == {0o600}
    res = verify(d, KEY)
    assert res.ok and res.records == 2 and res.anchored and res.last_hash == rec["hash"]


def test_fields_are_checked(tmp_path):
    with AuditLog(tmp_path, hmac_key=None) as log:
        with pytest.raises(ValueError):
            log.record("admin", hash="x")
        with pytest.raises(ValueError):
            log.record("admin", when=object())
        with pytest.raises(ValueError):
            log.record("admin", x=float("nan"))
        log.record("admin", ok=True)
    assert verify(tmp_path).ok
    with AuditLog(tmp_path) as log, pytest.raises(AuditError, match="another process"):
        AuditLog(tmp_path)


def _other(b: int) -> int:
    hexd = b"0123456789abcdef"
    return hexd[(hexd.index(b) + 1) % 16] if b in hexd else b ^ 0x01   # hex stays hex: the hash check must catch it


@pytest.mark.parametrize("key", [KEY, None])
def test_a_one_byte_edit_anywhere_in_a_record_is_named(tmp_path, key):
    path = make_log(tmp_path, key=key)
    original = lines(path)
    k = 4                                  # the fifth line, a record in the middle
    for pos in range(len(original[k])):
        edited = bytearray(original[k])
        edited[pos] = _other(edited[pos])
        path.write_bytes(b"".join(original[:k] + [bytes(edited)] + original[k + 1:]))
        bad = bad_at(tmp_path, key)
        assert (bad.file, bad.line) == (FIRST, k + 1), (pos, bad)
    same_value = original[k].replace(b"\\u00e9", b"\\u00E9")   # parses to the same record
    path.write_bytes(b"".join(original[:k] + [same_value] + original[k + 1:]))
    assert "not canonical" in bad_at(tmp_path, key).why


def test_an_edit_of_the_last_newline_is_a_truncation_the_anchor_shows(tmp_path):
    path = make_log(tmp_path)
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    bad = bad_at(tmp_path)
    assert bad.seq == 9 and "truncated" in bad.why


def test_removed_swapped_and_inserted_lines(tmp_path):
    path = make_log(tmp_path)
    orig = lines(path)
    path.write_bytes(b"".join(orig[:3] + orig[4:]))                       # line 4 removed
    assert (bad_at(tmp_path).line, "seq gap" in bad_at(tmp_path).why) == (4, True)
    path.write_bytes(b"".join(orig[:3] + [orig[4], orig[3]] + orig[5:]))  # lines 4 and 5 swapped
    assert bad_at(tmp_path).line == 4
    path.write_bytes(b"".join(orig[:6] + [orig[2]] + orig[6:]))           # an old line repeated
    assert (bad_at(tmp_path).line, "out of order" in bad_at(tmp_path).why) == (7, True)
    forged = json.loads(orig[5])                                          # a new record chained in
    forged.update(seq=7, prev=forged["hash"], model="evil")
    path.write_bytes(b"".join(orig[:6] + [seal(forged, None)] + orig[6:]))
    assert bad_at(tmp_path, None).line == 8           # the next record no longer follows
    assert "bad mac" in bad_at(tmp_path).why or "missing mac" in bad_at(tmp_path).why


def _rechain(path, k, key=None, **change):
    """Edit line k (0-based) and re-hash it and every later line, as someone without the key would."""
    out, prev = lines(path)[:k], None
    for raw in lines(path)[k:]:
        rec = json.loads(raw)
        if prev is None:
            rec.update(change)
        else:
            rec["prev"] = prev
        mac = rec.pop("mac", None)
        rec["hash"] = record_hash(rec)
        if mac is not None:
            rec["mac"] = mac
        out.append(canonical(rec) + b"\n")
        prev = rec["hash"]
    path.write_bytes(b"".join(out))
    return prev


def test_an_edit_rehashed_without_the_key_has_a_bad_mac(tmp_path):
    path = make_log(tmp_path)
    _rechain(path, 4, model="evil")
    bad = bad_at(tmp_path)
    assert (bad.line, bad.seq) == (5, 5) and "bad mac" in bad.why
    bad = bad_at(tmp_path, None)                       # without the key, the anchor still disagrees
    assert "history rewritten" in bad.why


def test_what_an_unsigned_chain_cannot_show(tmp_path):
    path = make_log(tmp_path, key=None)
    last = _rechain(path, 4, model="evil")
    assert not verify(tmp_path).ok
    anchor = json.loads((tmp_path / "anchor.json").read_text())
    (tmp_path / "anchor.json").write_text(json.dumps({**anchor, "hash": last}))
    assert verify(tmp_path).ok           # whoever can write log and anchor, and no key: undetectable
    path.write_bytes(b"".join(lines(path)[:-2]))
    assert "truncated" in bad_at(tmp_path, None).why
    (tmp_path / "anchor.json").unlink()
    res = verify(tmp_path)
    assert res.ok and any("no anchor" in n for n in res.notes)   # a cut tail needs an anchor


def test_the_key_is_checked_at_open(tmp_path):
    make_log(tmp_path, n=1)
    with pytest.raises(AuditError, match="signed"):
        AuditLog(tmp_path)
    with pytest.raises(AuditError, match="another HMAC key"):
        AuditLog(tmp_path, hmac_key=b"x" * 32)
    with AuditLog(tmp_path, hmac_key=KEY) as log:
        log.record("admin")
    assert verify(tmp_path, KEY).records == 3


def test_rotation_keeps_the_chain_and_a_removed_middle_file_is_named(tmp_path):
    make_log(tmp_path, n=40, max_bytes=1500, keep_files=None)
    names = sorted(p.name for p in tmp_path.glob("audit-*.jsonl"))
    assert len(names) >= 5
    res = verify(tmp_path, KEY)
    assert res.ok and res.records == 40 + len(names) and res.files == names
    first_of_3 = json.loads(lines(tmp_path / names[2])[0])
    last_of_2 = json.loads(lines(tmp_path / names[1])[-1])
    assert first_of_3["prev"] == last_of_2["hash"] and first_of_3["kind"] == "audit.file"
    (tmp_path / names[-1]).rename(tmp_path / "audit-000099.jsonl")
    assert "renamed" in bad_at(tmp_path).why
    (tmp_path / "audit-000099.jsonl").rename(tmp_path / names[-1])
    (tmp_path / names[2]).unlink()
    bad = bad_at(tmp_path)
    assert (bad.file, bad.line) == (names[3], 1) and names[2] in bad.why


def test_pruned_files_are_explained_and_a_removed_oldest_file_is_not(tmp_path):
    make_log(tmp_path, n=40, max_bytes=1500, keep_files=3)
    names = sorted(p.name for p in tmp_path.glob("audit-*.jsonl"))
    assert len(names) == 3 and names[0] != FIRST
    res = verify(tmp_path, KEY)
    assert res.ok and any("pruned" in n for n in res.notes)
    (tmp_path / names[0]).unlink()
    bad = bad_at(tmp_path)
    assert (bad.file, bad.line) == (names[1], 1) and "starts at seq" in bad.why


def test_a_torn_last_line_is_explained_then_recovered(tmp_path):
    path = make_log(tmp_path, n=3)
    whole = path.read_bytes()
    half = lines(path)[-1][:40]
    with open(path, "ab") as f:
        f.write(half)                                    # a crash in the middle of a write
    res = verify(tmp_path, KEY)
    assert res.ok and any("unfinished write" in n for n in res.notes)
    with AuditLog(tmp_path, hmac_key=KEY) as log:
        log.record("admin", action="after")
    torn = tmp_path / f"{FIRST}.{len(whole)}.torn"
    assert torn.read_bytes() == half and os.stat(torn).st_mode & 0o777 == 0o600
    recovered = json.loads(lines(path)[4])
    assert recovered["kind"] == "audit.recovered" and recovered["bytes"] == 40
    assert recovered["sha256"] == hashlib.sha256(half).hexdigest()
    res = verify(tmp_path, KEY)
    assert res.ok and res.records == 6 and any("recovered after a crash" in n for n in res.notes)


def test_a_crash_right_after_rotating_leaves_an_empty_file_that_open_completes(tmp_path):
    make_log(tmp_path, n=2)
    (tmp_path / "audit-000002.jsonl").touch()
    assert verify(tmp_path, KEY).ok
    with AuditLog(tmp_path, hmac_key=KEY) as log:
        log.record("admin")
    assert json.loads(lines(tmp_path / "audit-000002.jsonl")[0])["seq"] == 4
    assert verify(tmp_path, KEY).ok


def test_a_failed_write_leaves_no_half_record(tmp_path, monkeypatch):
    log = AuditLog(tmp_path, hmac_key=KEY)
    log.record("admin", n=1)
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(AuditError, match="not written"):
        log.record("admin", n=2)
    monkeypatch.setattr(os, "write", real_write)
    log.record("admin", n=3)
    log.close()
    res = verify(tmp_path, KEY)
    assert res.ok and [json.loads(x).get("n") for x in lines(tmp_path / FIRST)] == [None, 1, 3]


def test_two_threads_never_interleave(tmp_path):
    log = AuditLog(tmp_path, hmac_key=KEY, max_bytes=1 << 20)
    big = "x" * 20_000                               # records larger than a pipe buffer or a page

    def writer(name):
        for i in range(200):
            log.record("request", who=name, i=i, pad=big)
    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    res = verify(tmp_path, KEY)
    assert res.ok and res.records == 400 + len(res.files)
    recs = [json.loads(x) for p in sorted(tmp_path.glob("audit-*.jsonl")) for x in lines(p)]
    for who in "ab":
        assert [r["i"] for r in recs if r.get("who") == who] == list(range(200))


def test_the_request_record_carries_no_prompt_unless_asked(tmp_path):
    fields = dict(request_id="r1", principal="key-1", model="smollm2", prompt_tokens=12,
                  completion_tokens=5, status=200, duration_s=0.25, prompt="my secret question")
    with AuditLog(tmp_path / "off") as log:
        rec = log.request(**fields)
    assert "prompt" not in rec and b"secret" not in (tmp_path / "off" / FIRST).read_bytes()
    assert rec["prompt_tokens"] == 12 and rec["status"] == 200 and rec["principal"] == "key-1"
    with AuditLog(tmp_path / "on", record_prompts=True) as log:
        assert log.request(**fields)["prompt"] == "my secret question"


def test_a_kept_prompt_is_sealed_when_the_log_has_a_seal(tmp_path):
    from llmos.audit.events import open_prompt
    from llmos.kernel.jobs.sealing import Unreadable, load_keyring
    keys = load_keyring(tmp_path)
    fields = dict(request_id="r1", principal="key-1", model="m", prompt_tokens=1, completion_tokens=1,
                  status=200, duration_s=0.1, prompt=[{"role": "user", "content": "my secret question"}])
    with AuditLog(tmp_path / "log", record_prompts=True) as log:
        log.seal = keys.seal
        rec = log.request(**fields)
    assert "prompt" not in rec and b"secret" not in (tmp_path / "log" / FIRST).read_bytes()
    assert open_prompt(rec, keys.open) == fields["prompt"]
    with pytest.raises(Unreadable):   # authenticated as this request's: moved to another, it does not open
        open_prompt({**rec, "request_id": "r2"}, keys.open)


# ---------------------------------------------------------------- the CLI, on a real log


def run(d, *args, **kw):
    return CliRunner().invoke(audit_cli.audit, ["--dir", str(d), *args], catch_exceptions=False, **kw)


def test_cli_verify(tmp_path):
    path = make_log(tmp_path / "log")
    key = tmp_path / "key"
    key.write_bytes(KEY + b"\n")
    key.chmod(0o600)
    out = run(tmp_path / "log", "verify", "--key-file", str(key))
    assert out.exit_code == 0 and out.output.startswith("ok: 9 records in 1 files") and "macs checked" in out.output
    out = run(tmp_path / "log", "verify", env={"LLMOS_AUDIT_KEY_FILE": str(key)})
    assert out.exit_code == 0 and "macs checked" in out.output
    orig = lines(path)
    path.write_bytes(b"".join(orig[:3] + orig[4:]))
    out = run(tmp_path / "log", "verify", "--key-file", str(key))
    assert out.exit_code == 1 and out.output.startswith(f"BAD: {FIRST} line 4 (seq 5): seq gap")
    key.chmod(0o644)
    out = run(tmp_path / "log", "verify", "--key-file", str(key))
    assert out.exit_code == 1 and "chmod 600" in out.output
    assert run(tmp_path / "empty", "verify").exit_code == 1


def test_cli_tail_and_follow(tmp_path, monkeypatch):
    make_log(tmp_path, n=5)
    out = run(tmp_path, "tail", "-n", "2")
    assert [line.split()[1:3] for line in out.output.splitlines()] == [["#5", "model.load"], ["#6", "model.load"]]
    assert "model=m4" in out.output and "note=café" in out.output
    calls = []

    def sleep(_):                      # the poll: the first one writes a record, the second is ^C
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        with AuditLog(tmp_path, hmac_key=KEY, max_bytes=10) as log:   # rotates: follow must cross files
            log.record("admin", action="late")
    monkeypatch.setattr(audit_cli, "_sleep", sleep)
    out = run(tmp_path, "tail", "-n", "1", "-f", "--json")
    kinds = [json.loads(x)["kind"] for x in out.output.splitlines()]
    assert out.exit_code == 0 and kinds == ["model.load", "audit.file", "admin"]


def test_cli_show_since_and_kind(tmp_path):
    with AuditLog(tmp_path) as log:
        log.record("model.load", model="a")
        log.record("request", model="a", status=200)
        log.record("model.unload", model="a")
    out = run(tmp_path, "show", "--since", "1h", "--kind", "model.*")
    assert [x.split()[2] for x in out.output.splitlines()] == ["model.load", "model.unload"]
    assert run(tmp_path, "show", "--since", "2999-01-01").output == ""
    assert len(run(tmp_path, "show", "--since", "2000-01-01T00:00Z").output.splitlines()) == 4
    assert run(tmp_path, "show", "--since", "yesterday-ish").exit_code == 2
    assert audit_cli.parse_since("1h30m", 10_000.0) == 10_000.0 - 5400


def test_cli_keygen(tmp_path):
    key = tmp_path / "audit.key"
    out = CliRunner().invoke(audit_cli.audit, ["keygen", str(key)])
    assert out.exit_code == 0 and os.stat(key).st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
    assert CliRunner().invoke(audit_cli.audit, ["keygen", str(key)]).exit_code == 1
