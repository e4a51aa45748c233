"""Deletion that deletes, without processes: deleted files and jobs erased from the
database and its WAL (even their ciphertext), refusals while a job runs, purge, another
process holding the WAL, completion windows and file expiry on a moved clock, retention,
idempotency keys, and a schema 1 (plaintext) store sealed at start."""
from __future__ import annotations

import json
import sqlite3

import pytest

from llmos.kernel.jobs import JobStore
from llmos.kernel.jobs.refusals import Refused
from llmos.kernel.jobs.sealing import load_keyring
from test_jobs_sealing import (MARK, Clock, every_value_opens_with, home_bytes, lines_of, manager, run_to_end,
                               settle, submit)
from test_jobs_store import line, upload


# ---------------------------------------------------------------- deletion that deletes


def test_deleted_files_and_jobs_are_erased_from_the_database_and_its_wal(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 30)
    fid = m.store.get_job(job_id)["input_file_id"]
    with pytest.raises(Refused, match="batch_active: .* cancel it first"):
        m.commands["jobs.delete"]({"id": job_id})
    with pytest.raises(Refused, match="file_in_use"):
        m.commands["files.delete"]({"id": fid})
    run_to_end(m, job_id)
    keep = submit(m, 2)                      # another job's data stays
    run_to_end(m, keep)
    db = sqlite3.connect(tmp_path / "jobs.db")
    sealed = [r[0] for r in db.execute("SELECT text FROM file_lines WHERE file_id=?", (fid,))] + [
        r[0] for r in db.execute("SELECT response FROM requests WHERE job_id=?", (job_id,))]
    db.close()
    assert len(sealed) == 60 and all(s[-24:] in home_bytes(tmp_path) for s in sealed[:3])
    with pytest.raises(Refused, match="file_in_use: file-out-"):
        m.commands["files.delete"]({"id": f"file-out-{job_id}"})
    assert m.commands["jobs.delete"]({"id": job_id}) == {"id": job_id, "object": "batch", "deleted": True,
                                                        "input_file_deleted": False}
    assert m.commands["files.delete"]({"id": fid}) == {"id": fid, "object": "file", "deleted": True}
    for what, ident, code in (("jobs.delete", job_id, "batch_not_found"), ("files.delete", fid, "file_not_found")):
        with pytest.raises(Refused, match=code):
            m.commands[what]({"id": ident})
    assert m.get_job({"id": job_id}) is None and m.files.page({"id": fid}) is None
    assert m.keeper.status()["erasing"] == 2
    assert m.store.erase_some(1000, max_bytes=1) == 1         # a step is bounded by bytes as well as rows
    settle(m)
    assert m.keeper.status()["erasing"] == 0 and not m.keeper.status()["checkpoint_pending"]
    assert (tmp_path / "jobs.db-wal").stat().st_size == 0
    everything = home_bytes(tmp_path)
    assert not [s for s in sealed if s[-24:] in everything], "a deleted value is still on disk"
    assert len(lines_of(m, f"file-out-{keep}")) == 2
    m.close()


def test_another_process_reading_the_store_delays_the_checkpoint_and_nothing_spins(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 3)
    run_to_end(m, job_id)
    reader = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM requests").fetchone()          # a read transaction holds the WAL
    m.commands["jobs.delete"]({"id": job_id, "input_file": True})
    m.keeper.next_sweep = float("inf")
    assert m.keeper.tick() is True                                       # erasing
    assert m.keeper.tick() is False and m.keeper.status()["checkpoint_pending"]   # waits a round, no spinning
    reader.execute("COMMIT")
    reader.close()
    settle(m)
    assert not m.keeper.status()["checkpoint_pending"] and (tmp_path / "jobs.db-wal").stat().st_size == 0
    m.close()


def test_purge_deletes_ended_jobs_and_their_input_files(tmp_path):
    clock = Clock()
    m = manager(JobStore(tmp_path / "jobs.db"), clock=clock)
    old = [submit(m, 2) for _ in range(3)]
    for j in old:
        run_to_end(m, j)
    running = submit(m, 2)
    with pytest.raises(ValueError, match="older_than_s"):
        m.commands["jobs.purge"]({"older_than_s": -1})
    assert m.commands["jobs.purge"]({"older_than_s": 3600})["deleted"] == 0      # none ended an hour ago
    clock.shift = 7200
    out = m.commands["jobs.purge"]({"older_than_s": 3600})
    assert (out["deleted"], out["input_files_deleted"], sorted(out["ids"])) == (3, 3, sorted(old))
    assert [j["id"] for j in m.list_jobs({})] == [running]
    assert m.store.list_files(10) and len(m.store.list_files(10)) == 1
    m.close()


# ---------------------------------------------------------------- expiry and retention


def test_a_batch_past_its_completion_window_expires(tmp_path):
    clock = Clock()
    m = manager(JobStore(tmp_path / "jobs.db"), limit=2, clock=clock)
    for bad in ("24 hours", "0h", "1y", 24, "9999d"):
        with pytest.raises(ValueError, match="completion_window"):
            m.create({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": bad})
    job_id = submit(m, 5, completion_window="2h")
    view = m.get_job({"id": job_id})
    assert view["expires_at"] == view["created_at"] + 7200 and view["expired_at"] is None
    m.feed()
    m.front.answer(1)
    m.feed()
    settle(m)
    assert m.get_job({"id": job_id})["status"] == "in_progress"
    clock.shift = 7201
    m.keeper.next_sweep = 0.0
    m.keeper.tick()
    view = m.get_job({"id": job_id})
    assert view["status"] == "expired" and view["expired_at"] >= view["expires_at"]
    assert not m.front.live and len(m.front.aborted) == 2               # what ran was aborted
    assert view["llmos"]["counts"]["expired"] == 4 and view["request_counts"]["completed"] == 1
    errs = [json.loads(x) for x in lines_of(m, view["error_file_id"])]
    assert len(errs) == 4 and {e["error"]["code"] for e in errs} == {"batch_expired"}
    assert len(lines_of(m, view["output_file_id"])) == 1
    m.close()


def test_files_expire_and_retention_purges_old_jobs_and_files(tmp_path):
    clock = Clock()
    m = manager(JobStore(tmp_path / "jobs.db"), clock=clock, retention_days=2)
    fid, _ = upload(m.files, [line("a")])
    with pytest.raises(ValueError, match="expires_after"):
        m.files.commit({"id": fid, "expires_after_s": 60})
    fid, _ = upload(m.files, [line("a")])
    f = m.files.commit({"id": fid, "expires_after_s": 3600})
    assert f["expires_at"] == f["created_at"] + 3600
    done = submit(m, 2)
    run_to_end(m, done)
    reading = m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions"})["id"]
    assert m.files.get({"id": m.store.get_job(done)["input_file_id"]})["expires_at"] == f["created_at"] + 2 * 86400
    clock.shift = 2 * 3600
    m.keeper.sweep()
    assert m.files.get({"id": fid}) is not None          # expired, but a running job still reads it
    run_to_end(m, reading)
    m.keeper.sweep()
    assert m.files.get({"id": fid}) is None and m.get_job({"id": done}) is not None
    clock.shift = 3 * 86400
    m.keeper.sweep()
    assert m.list_jobs({}) == [] and m.store.list_files(10) == []
    settle(m)
    assert m.store.db.execute("SELECT COUNT(*) FROM file_lines").fetchone()[0] == 0
    m.close()


# ---------------------------------------------------------------- idempotency keys


def test_a_retry_with_an_idempotency_key_returns_the_first_object(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    lines = [line("a"), line("b")]

    def up(rows, key="up-1"):
        fid, _ = upload(m.files, rows)
        return m.files.commit({"id": fid, "idempotency_key": key})["id"]
    first = up(lines)
    assert up(lines) == first and len(m.store.list_files(10)) == 1
    with pytest.raises(Refused, match="idempotency_conflict"):
        up([line("a")])
    assert up([line("a")], key="up-2") != first
    args = {"input_file_id": first, "endpoint": "/v1/chat/completions", "idempotency_key": "job-1"}
    job = m.create(args)
    assert m.create(args)["id"] == job["id"] and len(m.list_jobs({})) == 1
    with pytest.raises(Refused, match="idempotency_conflict"):
        m.create({**args, "metadata": {"other": "body"}})
    with pytest.raises(ValueError, match="idempotency key"):
        m.create({**args, "idempotency_key": ""})
    run_to_end(m, job["id"])
    m.commands["jobs.delete"]({"id": job["id"]})
    assert m.create(args)["id"] != job["id"]             # a deleted job frees its key
    m.close()


# ---------------------------------------------------------------- a store of schema 1


SCHEMA_1 = """
CREATE TABLE files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0, lines INTEGER NOT NULL DEFAULT 0, endpoint TEXT,
    complete INTEGER NOT NULL DEFAULT 0);
CREATE TABLE file_lines (file_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (file_id, line_no)) WITHOUT ROWID;
CREATE UNIQUE INDEX file_custom_ids ON file_lines (file_id, custom_id);
CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, total INTEGER NOT NULL, next_line INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, in_progress_at INTEGER,
    finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    errors TEXT);
CREATE TABLE requests (job_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, request_id TEXT, status_code INTEGER, response TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, finished_at REAL,
    PRIMARY KEY (job_id, line_no)) WITHOUT ROWID;
PRAGMA user_version=1;
"""


def test_a_schema_1_store_is_sealed_at_start_and_its_plaintext_is_gone(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA secure_delete=OFF")   # (some builds of SQLite have it on by default)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO files VALUES ('file-1', 'mine.jsonl', 'batch', 1, 10, 3, '/v1/chat/completions', 1)")
    db.executemany("INSERT INTO file_lines VALUES ('file-1', ?, ?, ?)", [(i, f"q{i}", line(f"{MARK}-{i}"))
                                                                        for i in (1, 2, 3)])
    db.execute("INSERT INTO jobs (id, status, endpoint, input_file_id, completion_window, metadata, total, "
               "completed, next_line, created_at, in_progress_at) VALUES ('batch_1', 'in_progress', "
               f"'/v1/chat/completions', 'file-1', '24h', '{json.dumps({'m': MARK})}', 3, 1, 2, 1, 1)")
    db.execute("INSERT INTO requests (job_id, line_no, custom_id, state, status_code, response) VALUES "
               f"('batch_1', 1, 'q1', 'completed', 200, '{json.dumps({'answer': MARK})}')")
    db.execute("INSERT INTO file_lines VALUES ('file-gone', 1, 'x', ?)", (MARK * 50,))
    db.execute("DELETE FROM file_lines WHERE file_id='file-gone'")   # schema 1 had no secure_delete
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert MARK.encode() * 50 in home_bytes(tmp_path)     # deleted, and still on disk
    m = manager(JobStore(tmp_path / "jobs.db"))
    assert not m.store.legacy and not m.keeper.resealer.active
    assert MARK.encode() not in home_bytes(tmp_path)
    job = run_to_end(m, "batch_1")
    assert job["status"] == "completed" and job["metadata"] == {"m": MARK}
    out = [json.loads(x) for x in lines_of(m, "file-out-batch_1")]
    assert out[0]["response"]["body"] == {"answer": MARK} and [o["custom_id"] for o in out] == ["q1", "q2", "q3"]
    assert m.files.get({"id": "file-1"})["filename"] == "mine.jsonl"
    m.close()
    assert every_value_opens_with(tmp_path, load_keyring(tmp_path)) == 1 + 1 + 6 + 6
