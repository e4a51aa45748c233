"""The job subsystem without processes: batch-file validation, the SQLite store on a real
file (durability across reopen, exactly-once results, job transitions) and JobManager
feeding a fake front door (bounded in flight, resume after a crash, cancel, retries)."""
from __future__ import annotations

import json
import subprocess
import time
import sys
from types import SimpleNamespace

import pytest

from llmos import protocol
from llmos.kernel.jobs import JobManager, JobStore
from llmos.kernel.jobs.batchfile import LineError, check_line, submit_of
from llmos.kernel.jobs.files import Files
from llmos.kernel.jobs.store import StoreError

MODELS = {"tiny": SimpleNamespace(driver_ready=True, tokenizer="tokenizer-tiny")}


def line(cid, url="/v1/chat/completions", **body) -> str:
    body = {"model": "tiny", **body}
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "user", "content": f"hi {cid}"}])
    else:
        body.setdefault("prompt", f"hi {cid}")
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def upload(files: Files, lines: list, chunk: int = 3) -> tuple[str, list]:
    fid = files.begin({"filename": "x.jsonl"})["id"]
    errors = []
    for i in range(0, len(lines), chunk):
        errors += files.append({"id": fid, "first_line": i + 1, "lines": lines[i:i + chunk]})["errors"]
    return fid, errors


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


# ---------------------------------------------------------------- batch files


def test_check_line_accepts_both_endpoints_and_skips_blank_lines():
    chat = check_line(1, line("a", max_tokens=5, temperature=0), {"tiny"})
    assert (chat.custom_id, chat.url, chat.parsed.model, chat.parsed.params.max_tokens) == (
        "a", "/v1/chat/completions", "tiny", 5)
    comp = check_line(2, line("b", url="/v1/completions").encode(), {"tiny"})
    assert comp.parsed.prompt == "hi b" and not comp.parsed.chat
    assert check_line(3, "   \r\n", {"tiny"}) is None


def test_job_lines_run_in_the_batch_class():
    def submit(**body):
        return submit_of(check_line(1, line("a", **body)), "rid")
    assert (submit().priority, submit().tenant) == ("batch", "batch")
    assert submit(priority="batch:3").priority == "batch:3" and submit(priority=2).priority == "batch:2"
    assert submit(priority="realtime").priority == "batch"            # a job cannot jump the queue
    assert submit(tenant="alice").tenant == "alice" and submit(timeout=30).timeout_s == 30


@pytest.mark.parametrize("raw, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}), "missing body"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}), "method must be"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}), "url must be one of"),
    (json.dumps({"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}}), "custom_id must be"),
    (line("a", temperature=9), "body.temperature: temperature must be between"),
    (line("a", stream=True), "cannot stream"),
    (line("a", model="nope"), "model 'nope' is not served (served: tiny)"),
    (b"\xff\xfe", "not valid UTF-8"),
])
def test_check_line_names_what_is_wrong(raw, why):
    with pytest.raises(LineError, match=why.replace("(", r"\(").replace(")", r"\)")) as exc:
        check_line(7, raw, {"tiny"})
    assert exc.value.line_no == 7


def test_upload_reports_every_bad_line_by_number(store):
    files = Files(store, MODELS)
    lines = [line("a"), "oops", line("b"), "", line("a"), line("c", url="/v1/completions"), line("d", top_p=5)]
    fid, errors = upload(files, lines)
    assert [e[0] for e in errors] == [2, 5, 6, 7]
    assert "duplicate custom_id 'a' (first on line 1)" in errors[1][1]
    assert "differs from line 1's /v1/chat/completions" in errors[2][1]
    with pytest.raises(ValueError, match="4 invalid"):
        files.commit({"id": fid})
    assert store.get_file(fid) is None  # discarded, never usable


def test_upload_commit_and_pages(store):
    files = Files(store, MODELS)
    fid, errors = upload(files, [line(f"r{i}") for i in range(7)] + [""])
    assert errors == []
    obj = files.commit({"id": fid, "purpose": "batch"})
    assert obj["object"] == "file" and obj["llmos"] == {"requests": 7, "endpoint": "/v1/chat/completions"}
    page = files.page({"id": fid, "after": 0, "limit": 5})
    assert page["next"] == 5 and len(page["lines"]) == 5
    assert files.page({"id": fid, "after": 5, "limit": 5}) == {"lines": [line("r5"), line("r6")], "next": None}
    assert files.page({"id": "file-nope"}) is None and files.get({"id": "file-nope"}) is None
    with pytest.raises(ValueError, match="no upload in progress"):
        files.append({"id": fid, "first_line": 9, "lines": []})


# ---------------------------------------------------------------- the store


def make_job(store, n=5) -> dict:
    files = Files(store, MODELS)
    fid, _ = upload(files, [line(f"r{i}") for i in range(n)])
    files.commit({"id": fid})
    store.create_job("batch_1", store.get_file(fid), "/v1/chat/completions", "24h", {"k": "v"}, 100)
    return store.get_job("batch_1")


def result(line_no, state="completed", tokens=3):
    return {"job_id": "batch_1", "line_no": line_no, "state": state, "status_code": 200 if state == "completed"
            else 400, "response": json.dumps({"n": line_no}), "prompt_tokens": 2, "completion_tokens": tokens,
            "finished_at": 1.0}


def test_store_survives_reopen_and_writes_each_result_once(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = make_job(store)
    assert (job["status"], job["total"], job["metadata"]) == ("in_progress", 5, {"k": "v"})
    rows = store.next_lines(job, 3)
    assert [r[0] for r in rows] == [1, 2, 3] and all(r[3] for r in rows)
    store.mark_running("batch_1", [(n, cid, f"rid{n}") for n, cid, _, _ in rows], 4)
    assert len(store.finish([result(1), result(2, "failed")])) == 2
    assert store.finish([result(1, tokens=99)]) == []   # a second result for a line is ignored
    store.close()                                        # "crash" with line 3 running

    store = JobStore(tmp_path / "jobs.db")
    assert store.recover() == 1
    job = store.get_job("batch_1")
    assert (job["completed"], job["failed"], job["completion_tokens"], job["next_line"]) == (1, 1, 6, 4)
    assert store.request_states("batch_1") == {"completed": 1, "failed": 1, "pending": 1}
    assert [(r[0], r[3]) for r in store.next_lines(job, 10)] == [(3, False), (4, True), (5, True)]
    assert [r["line_no"] for r in store.output_page("batch_1", 0, 10)] == [1]
    assert json.loads(store.output_page("batch_1", 0, 10)[0]["response"]) == {"n": 1}
    store.close()


def test_job_transitions_are_checked(store):
    make_job(store)
    with pytest.raises(StoreError, match="in_progress -> completed"):
        store.set_status("batch_1", "completed", 1)
    store.set_status("batch_1", "cancelling", 1)
    store.set_status("batch_1", "cancelled", 2)
    assert store.get_job("batch_1")["cancelled_at"] == 2
    with pytest.raises(StoreError):
        store.set_status("batch_1", "in_progress", 3)


def test_the_kernel_side_imports_neither_torch_nor_aiohttp():
    code = "import sys, llmos.kernel.jobs; print(sorted({'torch', 'aiohttp'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


# ---------------------------------------------------------------- JobManager on a fake front door


class FakeFront:
    draining = False

    def __init__(self):
        self.live: dict[str, protocol.Submit] = {}
        self.aborted: list[str] = []
        self.most = 0
        self.deliver = None

    def submit(self, peer, m):
        assert peer == "@jobs" and m.tenant == "batch" and m.priority == "batch"
        self.live[m.request_id] = m
        self.most = max(self.most, len(self.live))

    def abort(self, m):
        self.aborted.append(m.request_id)
        self.live.pop(m.request_id)

    def answer(self, k: int, status: int = 200) -> None:
        for rid in list(self.live)[:k]:
            m = self.live.pop(rid)
            if status != 200:
                self.deliver(protocol.Rejected(rid, status, "model_unavailable", "not loaded", None))
                continue
            self.deliver(protocol.Accepted(rid, prompt_tokens=4))
            text = m.messages[0]["content"].upper()
            self.deliver(protocol.Outputs(items=[protocol.OutputItem(
                rid=rid, index=0, text=text, n=2, ids=[5, 6], lp=None, finish="stop",
                usage={"prompt_tokens": 4, "completion_tokens": 2})]))


def manager(store, front, limit=4) -> JobManager:
    m = JobManager(store, front, MODELS, lambda name: True, max_in_flight=limit)
    front.deliver = m.deliver
    m.resume()
    return m


def submit_job(m: JobManager, n: int) -> str:
    fid, errors = upload(m.files, [line(f"r{i}") for i in range(n)], chunk=50)
    assert not errors
    m.files.commit({"id": fid})
    return m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions"})["id"]


def outputs(m: JobManager, job_id: str, kind="out") -> dict:
    lines = m.files.page({"id": f"file-{kind}-{job_id}", "limit": 5000})["lines"]
    return {json.loads(x)["custom_id"]: json.loads(x) for x in lines}


def test_manager_feeds_a_bounded_number_and_resumes_after_a_crash(tmp_path):
    store, front = JobStore(tmp_path / "jobs.db"), FakeFront()
    m = manager(store, front)
    job_id = submit_job(m, 10)
    m.feed()
    front.answer(3)
    m.feed()
    assert front.most == 4 and len(front.live) == 4
    before = outputs(m, job_id)
    assert sorted(before) == ["r0", "r1", "r2"]
    assert before["r0"]["response"]["body"]["choices"][0]["message"]["content"] == "HI R0"
    view = m.get_job({"id": job_id})
    assert view["llmos"]["counts"] == {"total": 10, "pending": 3, "running": 4, "completed": 3, "failed": 0,
                                       "cancelled": 0, "expired": 0}
    store.close()   # the kernel dies with 4 requests in flight

    store, front = JobStore(tmp_path / "jobs.db"), FakeFront()
    m = manager(store, front)
    while m.get_job({"id": job_id})["status"] == "in_progress":
        m.feed()
        front.answer(2)
    view = m.get_job({"id": job_id})
    assert view["status"] == "completed" and view["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert view["output_file_id"] == f"file-out-{job_id}" and view["error_file_id"] is None
    after = outputs(m, job_id)
    assert sorted(after) == [f"r{i}" for i in range(10)]
    assert all(after[cid] == before[cid] for cid in before)   # results from before the crash are kept
    assert view["usage"]["output_tokens"] == 20 and store.request_states(job_id) == {"completed": 10}
    store.close()


def test_transient_refusals_are_retried_and_other_errors_are_results(store):
    front = FakeFront()
    m = manager(store, front, limit=2)
    job_id = submit_job(m, 3)
    m.feed()
    front.answer(2, status=503)            # e.g. the model driver is restarting
    m._paused.clear()
    m.feed()
    assert sorted(front.live) == [f"job-{job_id}-1", f"job-{job_id}-2"]
    front.answer(1, status=400)
    front.answer(1)
    m.feed()
    front.answer(1)
    view = m.get_job({"id": job_id})
    assert view["status"] == "completed" and view["request_counts"]["failed"] == 1
    err = outputs(m, job_id, "err")["r0"]["response"]
    assert err["status_code"] == 400 and err["body"]["error"]["code"] == "model_unavailable"
    assert m.recent_errors[-1]["line"] == 1


def test_cancel_aborts_in_flight_and_lists_unfinished_lines_as_errors(store):
    front = FakeFront()
    m = manager(store, front, limit=3)
    job_id = submit_job(m, 8)
    m.feed()
    front.answer(1)
    m.feed()
    view = m.cancel({"id": job_id})
    assert view["status"] == "cancelled" and len(front.aborted) == 3 and not front.live
    assert view["llmos"]["counts"]["cancelled"] == 7
    assert m.cancel({"id": job_id})["status"] == "cancelled" and m.cancel({"id": "batch_nope"}) is None
    m.feed()
    assert not front.live                  # nothing is fed after a cancel
    errs = outputs(m, job_id, "err")
    assert sorted(errs) == [f"r{i}" for i in range(1, 8)]
    assert {e["error"]["code"] for e in errs.values()} == {"batch_cancelled"}
    assert list(outputs(m, job_id)) == ["r0"]


def test_quota_refusals_and_default_queue_deadlines_are_retried(store):
    front = FakeFront()
    m = manager(store, front, limit=3)
    job_id = submit_job(m, 3)
    m.feed()
    quota, queued, total = list(front.live)
    front.live.clear()
    before = time.monotonic()
    m.deliver(protocol.Rejected(quota, 429, "quota_exceeded", "over quota", None, retry_after=5.0))
    m.deliver(protocol.Rejected(queued, 408, "queue_timeout", "waited too long", None))
    m.deliver(protocol.Rejected(total, 408, "total_timeout", "ran too long", None))
    assert store.request_states(job_id) == {"pending": 2, "failed": 1}
    assert m._paused[job_id] >= before + 5.0      # Retry-After is honoured (however slow this machine is)
