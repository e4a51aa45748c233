"""JobManager: runs durable batch jobs through the kernel as the in-kernel client "@jobs".

    feed: take the next lines of the oldest active job from the store, mark them running
          (committed), submit them to the front door -- at most max_in_flight in all
    deliver: accumulate each request's outputs; at its final item commit the result
    finish: a job whose every line has a result becomes completed

Exactly once: a line's result is committed once (see store.py); at start, lines that were
running when the kernel died go back to pending and are sent again, finished ones never.
Transient refusals (429/503/504, see _transient) put a line back to pending; any other
error is the line's result (it goes to the error file). Lines run in the batch priority
class, tenant "batch" unless the line names one.

Wiring (kernel/core.py): local_clients["@jobs"] = deliver; `commands` and `queries` join
the kernel's tables; run() is a task (it resumes unfinished jobs first); close() at exit.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections import deque
from dataclasses import dataclass

from llmos import protocol
from llmos.openai_format import ResponseShaper
from llmos.kernel.jobs.batchfile import PARSERS, BatchLine, LineError, check_line, error_body, submit_of
from llmos.kernel.jobs.files import Files
from llmos.kernel.jobs.store import ACTIVE, JobStore, StoreError
from llmos.kernel.jobs.views import job_view
from llmos.kernel.waiting import wait_event

log = logging.getLogger(__name__)
PEER = "@jobs"
TRANSIENT = (429, 503, 504)   # over quota, model loading, daemon draining: the line runs again later
RETRY_PAUSE_S = 1.0      # after a transient refusal, a job waits this long (or Retry-After) to feed again


def _transient(msg: protocol.Rejected, line: BatchLine) -> bool:
    """A refusal that says "not now" rather than "never". A queue deadline the line did not
    set itself is the server's default for interactive clients: a job waits its turn."""
    return msg.status in TRANSIENT or (msg.status == 408 and msg.code == "queue_timeout"
                                       and line.parsed.queue_timeout_s is None)


def _guarded(handlers: dict) -> dict:
    """The kernel answers ValueError as a refusal; a store failure (disk full, a broken
    transition) must be answered too, never left to time out."""
    def guard(name, fn):
        def handler(args):
            try:
                return fn(args)
            except (sqlite3.Error, StoreError) as exc:
                log.exception("jobs: %s failed", name)
                raise ValueError(f"job store error: {exc}") from None
        return handler
    return {name: guard(name, fn) for name, fn in handlers.items()}


@dataclass
class Flight:
    job_id: str
    line: BatchLine
    shaper: ResponseShaper | None = None


class JobManager:
    def __init__(self, store: JobStore, front, engines: dict, is_running, max_in_flight: int = 64,
                 models=None):
        self.store, self.front, self.engines = store, front, engines
        self._is_running = is_running       # driver name -> bool
        self.max_in_flight = max_in_flight
        self.files = Files(store, engines if models is None else models)   # what a line may name
        self.flights: dict[str, Flight] = {}     # request id -> the line it runs
        self.active: list[str] = []              # job ids still to feed or finish, oldest first
        self._paused: dict[str, float] = {}      # job id -> monotonic time feeding may resume
        self._finished: dict[str, deque] = {}    # job id -> (monotonic, tokens) of recent results
        self.recent_errors: deque = deque(maxlen=50)
        self.wakeup = asyncio.Event()
        self.commands = _guarded({"files.begin": self.files.begin, "files.append": self.files.append,
                                  "files.commit": self.files.commit, "files.discard": self.files.discard,
                                  "jobs.create": self.create, "jobs.cancel": self.cancel})
        self.queries = _guarded({"files.get": self.files.get, "files.page": self.files.page,
                                 "jobs.list": self.list_jobs, "jobs.get": self.get_job,
                                 "jobs.errors": lambda args: list(self.recent_errors)})

    # ------------------------------------------------------------ lifecycle
    def resume(self) -> None:
        requeued = self.store.recover()
        for job_id in self.store.active_jobs():
            job = self.store.get_job(job_id)
            if job["status"] == "cancelling":
                self._cancel_now(job)
            elif job["status"] == "finalizing":
                self.store.set_status(job_id, "completed", int(time.time()))
            else:
                self.active.append(job_id)
        if self.active or requeued:
            log.info("jobs: resuming %d job(s); %d request(s) were in flight and are sent again",
                     len(self.active), requeued)

    async def run(self) -> None:
        self.resume()
        while True:
            self.wakeup.clear()
            try:
                self.feed()
                self.files.drop_idle()
            except Exception:  # the job loop must outlive any one bad job
                log.exception("jobs: feeding failed")
            await wait_event(self.wakeup, 0.5)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------ feeding
    def feed(self) -> None:
        if self.front.draining:
            return
        now = time.monotonic()
        for job_id in list(self.active):
            room = self.max_in_flight - len(self.flights)
            if room <= 0:
                return
            job = self.store.get_job(job_id)
            if job is None or job["status"] != "in_progress":
                self._retire(job_id)
            elif self._paused.get(job_id, 0.0) <= now:
                rows = self.store.next_lines(job, room)
                if rows:
                    self._start(job, rows)
                else:
                    self._maybe_finish(job)

    def _start(self, job: dict, rows: list) -> None:
        starting, next_line = [], job["next_line"]
        for line_no, custom_id, text, new in rows:
            try:
                line, problem = check_line(line_no, text), None
            except LineError as exc:  # validated at upload; only a changed llmos gets here
                line, problem = None, str(exc)
            if line is not None and not self._ready(line.parsed.model):
                self._paused[job["id"]] = time.monotonic() + RETRY_PAUSE_S
                break
            starting.append((line_no, custom_id, f"job-{job['id']}-{line_no}", line, problem))
            next_line = line_no + 1 if new else next_line
        if not starting:
            return
        self.store.mark_running(job["id"], [s[:3] for s in starting], next_line)
        for line_no, custom_id, rid, line, problem in starting:
            if line is None:
                self._record([self._result(job["id"], line_no, 400, error_body(400, "invalid_request", problem))])
                continue
            self.flights[rid] = Flight(job["id"], line)   # first: the front door may answer before submit returns
            try:
                self.front.submit(PEER, submit_of(line, rid))
            except Exception as exc:   # this line cannot run: it is its result, and the job goes on
                log.exception("jobs: line %d of %s could not be submitted", line_no, job["id"])
                self._line_failed(rid, f"the line could not be submitted: {type(exc).__name__}: {exc}")

    def _ready(self, model: str) -> bool:
        """Whether a request for `model` can be admitted now (unknown models fail at once)."""
        engine = self.engines.get(model)
        return engine is None or (engine.driver_ready and self._is_running(engine.tokenizer))

    # ------------------------------------------------------------ answers from the front door
    def deliver(self, msg) -> None:
        """Kernel.local_clients["@jobs"]: Accepted / Rejected / Outputs for our requests.
        Never raises: it runs inside the front door's own loop over other clients' outputs."""
        try:
            self._deliver(msg)
        except Exception:
            log.exception("jobs: could not handle %s", type(msg).__name__)
        self.wakeup.set()

    def _deliver(self, msg) -> None:
        if isinstance(msg, protocol.Outputs):
            done = []
            for item in msg.items:
                rid = item.rid
                f = self.flights.get(rid)
                if f is None:
                    continue
                try:   # one line's bad output is that line's error; the other items still count
                    f.shaper = f.shaper or ResponseShaper(f.line.parsed, rid, 0)
                    f.shaper.add(item)
                    if f.shaper.done:
                        del self.flights[rid]
                        body = f.shaper.response()
                        done.append(self._result(f.job_id, f.line.line_no, 200, body, body["usage"]))
                except Exception as exc:
                    log.exception("jobs: output of %s could not be used", rid)
                    self._line_failed(rid, f"its output could not be recorded: {type(exc).__name__}: {exc}")
            if done:
                self._record(done)
        elif isinstance(msg, protocol.Accepted) and msg.request_id in self.flights:
            f = self.flights[msg.request_id]
            f.shaper = ResponseShaper(f.line.parsed, msg.request_id, msg.prompt_tokens)
        elif isinstance(msg, protocol.Rejected) and msg.request_id in self.flights:
            f = self.flights.pop(msg.request_id)
            if _transient(msg, f.line):
                self.store.requeue(f.job_id, [f.line.line_no])
                until = time.monotonic() + (msg.retry_after or RETRY_PAUSE_S)
                self._paused[f.job_id] = max(self._paused.get(f.job_id, 0.0), until)
            else:
                self._record([self._result(f.job_id, f.line.line_no, msg.status,
                                           error_body(msg.status, msg.code, msg.message, msg.param))])

    def _line_failed(self, rid: str, why: str) -> None:
        """End the line `rid` runs with a 500 as its result (its request, if any, is aborted)."""
        f = self.flights.pop(rid, None)
        if f is None:
            return
        self.front.abort(protocol.Abort(request_id=rid, reason=why))
        self._record([self._result(f.job_id, f.line.line_no, 500, error_body(500, "internal_error", why))])

    @staticmethod
    def _result(job_id: str, line_no: int, status: int, body: dict, usage: dict | None = None) -> dict:
        usage = usage or {}
        return {"job_id": job_id, "line_no": line_no, "state": "completed" if status == 200 else "failed",
                "status_code": status, "response": json.dumps(body, ensure_ascii=False),
                "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0), "finished_at": time.time()}

    def _record(self, results: list[dict]) -> None:
        now = time.monotonic()
        try:
            applied = self.store.finish(results)
        except (sqlite3.Error, StoreError):  # e.g. disk full: run these lines again later
            for r in results:
                self.store.requeue(r["job_id"], [r["line_no"]])
            raise
        for r in applied:
            self._finished.setdefault(r["job_id"], deque(maxlen=10_000)).append((now, r["completion_tokens"]))
            if r["state"] == "failed":
                err = json.loads(r["response"])["error"]
                self.recent_errors.append({"at": r["finished_at"], "job": r["job_id"], "line": r["line_no"],
                                           "status": r["status_code"], "code": err["code"], "message": err["message"]})
        for job_id in {r["job_id"] for r in results}:
            self._maybe_finish(self.store.get_job(job_id))

    def _maybe_finish(self, job: dict | None) -> None:
        if (job and job["status"] == "in_progress" and job["completed"] + job["failed"] >= job["total"]
                and not self._running(job["id"])):
            now = int(time.time())
            self.store.set_status(job["id"], "finalizing", now)
            self.store.set_status(job["id"], "completed", now)
            self._retire(job["id"])
            log.info("job %s completed: %d ok, %d failed", job["id"], job["completed"], job["failed"])

    def _retire(self, job_id: str) -> None:
        if job_id in self.active:
            self.active.remove(job_id)
        self._paused.pop(job_id, None)
        self._finished.pop(job_id, None)

    def _running(self, job_id: str) -> int:
        return sum(1 for f in self.flights.values() if f.job_id == job_id)

    # ------------------------------------------------------------ commands and queries
    def create(self, args: dict) -> dict:
        """jobs.create {input_file_id, endpoint, completion_window, metadata}: the job is
        committed (fsynced) before this returns."""
        file_id, endpoint = args.get("input_file_id"), args.get("endpoint")
        window, metadata = args.get("completion_window") or "24h", args.get("metadata")
        f = self.store.get_file(file_id) if isinstance(file_id, str) else None
        if f is None:
            raise ValueError(f"input_file_id: no file {file_id!r}")
        if f["purpose"] != "batch":
            raise ValueError(f"input_file_id: file {file_id} has purpose {f['purpose']!r}, not 'batch'")
        if endpoint not in PARSERS:
            raise ValueError(f"endpoint must be one of {', '.join(PARSERS)}, got {endpoint!r}")
        if endpoint != f["endpoint"]:
            raise ValueError(f"endpoint {endpoint} does not match the file's requests ({f['endpoint']})")
        if not isinstance(window, str) or len(window) > 16:
            raise ValueError("completion_window must be a string such as '24h'")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            raise ValueError("metadata must be an object of at most 16 string keys (64) and values (512)")
        job_id = f"batch_{uuid.uuid4().hex[:24]}"
        self.store.create_job(job_id, f, endpoint, window, metadata, int(time.time()))
        self.active.append(job_id)
        self.wakeup.set()
        log.info("job %s accepted: %d request(s) from %s", job_id, f["lines"], file_id)
        return self.view(self.store.get_job(job_id))

    def cancel(self, args: dict) -> dict | None:
        """jobs.cancel {id}: stop feeding, abort what runs; idempotent on finished jobs."""
        job = self.store.get_job(args.get("id")) if isinstance(args.get("id"), str) else None
        if job is None:
            return None
        if job["status"] == "in_progress":
            self.store.set_status(job["id"], "cancelling", int(time.time()))
            self._cancel_now(job)
        return self.view(self.store.get_job(job["id"]))

    def _cancel_now(self, job: dict) -> None:
        for rid in [rid for rid, f in self.flights.items() if f.job_id == job["id"]]:
            del self.flights[rid]
            self.front.abort(protocol.Abort(request_id=rid, reason="batch job cancelled"))
        self.store.cancel_unfinished(job["id"])
        self.store.set_status(job["id"], "cancelled", int(time.time()))
        self._retire(job["id"])
        log.info("job %s cancelled", job["id"])

    def get_job(self, args: dict) -> dict | None:
        job = self.store.get_job(args.get("id")) if isinstance(args.get("id"), str) else None
        return self.view(job) if job else None

    def list_jobs(self, args: dict) -> list[dict]:
        limit = args.get("limit", 100)
        if not isinstance(limit, int) or not 0 < limit <= 1000:
            raise ValueError("limit must be an integer in 1..1000")
        after = args.get("after")
        return [self.view(j) for j in self.store.list_jobs(limit, after if isinstance(after, str) else None)]

    def view(self, job: dict) -> dict:
        jid = job["id"]
        return job_view(job, self._running(jid) if job["status"] in ACTIVE else 0, self._finished.get(jid))
