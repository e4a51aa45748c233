"""JobManager: runs durable batch jobs through the kernel as the in-kernel client "@jobs".

    feed: take the next lines of the oldest active job from the store, mark them running
          (committed), submit them to the front door -- at most max_in_flight in all
    deliver: accumulate each request's outputs; at its final item commit the result
    finish: a job whose every line has a result becomes completed

Exactly once: a line's result is committed once (see store.py); at start, lines that were
running when the kernel died go back to pending and are sent again, finished ones never.
Transient refusals (429/503/504, see _transient) put a line back to pending; any other
error is the line's result (it goes to the error file). Lines run in the batch priority
class, tenant "batch" unless the line names one. A job still running when its completion
window ends expires: what runs is aborted, the rest fails with batch_expired.

Between feeds the loop runs the store's upkeep (housekeeping.py: expiry, retention,
erasure of deleted data, re-sealing after a key rotation), a bounded step at a time.

Wiring (kernel/core.py): local_clients["@jobs"] = deliver; `commands` and `queries` join
the kernel's tables (those in ADMIN_ONLY are the admin's); run() is a task (it resumes
unfinished jobs first); close() at exit.
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
from llmos.kernel.jobs.batchfile import BatchLine, LineError, check_line, error_body, submit_of
from llmos.kernel.jobs.files import Files
from llmos.kernel.jobs.housekeeping import Housekeeper
from llmos.kernel.jobs.intake import check_create
from llmos.kernel.jobs.refusals import Refused
from llmos.kernel.jobs.rotation import rotate_offline
from llmos.kernel.jobs.sealing import Unreadable
from llmos.kernel.jobs.states import ACTIVE
from llmos.kernel.jobs.store import JobStore, StoreError
from llmos.kernel.jobs.views import job_view
from llmos.kernel.waiting import wait_event

log = logging.getLogger(__name__)
PEER = "@jobs"
TRANSIENT = (429, 503, 504)   # over quota, model loading, daemon draining: the line runs again later
RETRY_PAUSE_S = 1.0      # after a transient refusal, a job waits this long (or Retry-After) to feed again
ADMIN_ONLY = frozenset({"jobs.purge", "storage.rotate", "storage.status"})   # every tenant's data, or the keys


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
                raise Refused("storage_unavailable", f"job store error: {exc}") from None
        return handler
    return {name: guard(name, fn) for name, fn in handlers.items()}


@dataclass
class Flight:
    job_id: str
    line: BatchLine
    shaper: ResponseShaper | None = None


class JobManager:
    admin_only = ADMIN_ONLY   # commands and queries only an admin may send (kernel/access.py)

    def __init__(self, store: JobStore, front, engines: dict, is_running, max_in_flight: int = 64,
                 models=None, retention_days: float | None = None, clock=time.time):
        """`retention_days`: finished jobs and files older than this are deleted (None: kept);
        `clock`: wall time, for completion windows and retention (tests move it)."""
        self.store, self.front, self.engines = store, front, engines
        self._is_running = is_running       # driver name -> bool
        self.max_in_flight = max_in_flight
        self.files = Files(store, engines if models is None else models)   # what a line may name
        self.flights: dict[str, Flight] = {}     # request id -> the line it runs
        self.active: list[str] = []              # job ids still to feed or finish, oldest first
        self._paused: dict[str, float] = {}      # job id -> monotonic time feeding may resume
        self._finished: dict[str, deque] = {}    # job id -> (monotonic, tokens) of recent results
        self.recent_errors: deque = deque(maxlen=50)
        self.lines_done = {"completed": 0, "failed": 0}   # lines with a result since the kernel started
        self.wakeup = asyncio.Event()
        self.clock = clock
        self.keeper = Housekeeper(store, self.expire, self._retire, retention_days, clock)
        self.files.retention_s = self.keeper.retention_s
        self.commands = _guarded({"files.begin": self.files.begin, "files.append": self.files.append,
                                  "files.commit": self.files.commit, "files.discard": self.files.discard,
                                  "files.delete": self._woken(self.files.delete), "jobs.create": self.create,
                                  "jobs.cancel": self.cancel,
                                  **{k: self._woken(f) for k, f in self.keeper.commands.items()}})
        self.queries = _guarded({"files.get": self.files.get, "files.page": self.files.page,
                                 "files.list": self.files.list, "jobs.list": self.list_jobs, "jobs.get": self.get_job,
                                 "jobs.errors": lambda args: list(self.recent_errors), **self.keeper.queries})

    # ------------------------------------------------------------ lifecycle
    def resume(self) -> None:
        requeued = self.store.recover()
        for job_id in self.store.active_jobs():
            job = self.store.get_job(job_id)
            if job["status"] == "cancelling":
                self._stop(job_id, "cancelled")
            elif job["status"] == "finalizing":
                self.store.set_status(job_id, "completed", int(time.time()))
            else:
                self.active.append(job_id)
        if self.active or requeued:
            log.info("jobs: resuming %d job(s); %d request(s) were in flight and are sent again",
                     len(self.active), requeued)
        if self.store.legacy:   # a schema 1 store: sealed now, once, before anything is served
            started = time.monotonic()
            rotate_offline(self.store, new_key=False)
            log.warning("jobs: the job store was sealed (schema 1 -> 2) in %.1f s", time.monotonic() - started)
        elif self.keeper.resealer.needed():   # a rotation the last kernel did not finish
            self.keeper.resealer.start()

    async def run(self) -> None:
        self.resume()
        while True:
            self.wakeup.clear()
            busy = False
            try:
                self.feed()
                self.files.drop_idle()
            except Exception:  # the job loop must outlive any one bad job
                log.exception("jobs: feeding failed")
            try:
                busy = self.keeper.tick()
            except Exception:  # e.g. disk full: upkeep waits for the next round
                log.exception("jobs: upkeep failed")
            await wait_event(self.wakeup, 0 if busy else 0.5)

    def _woken(self, handler):
        """A command after which the loop has upkeep to do at once (erasure, re-sealing)."""
        def run(args):
            answer = handler(args)
            self.wakeup.set()
            return answer
        return run

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
                if isinstance(text, Unreadable):   # altered in the store, or its key is gone
                    line, problem = None, (500, "record_unreadable", str(text))
                else:
                    line, problem = check_line(line_no, text), None
            except LineError as exc:  # validated at upload; only a changed llmos gets here
                line, problem = None, (400, "invalid_request", str(exc))
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
                self._record([self._result(job["id"], line_no, problem[0], error_body(*problem))])
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
            self.lines_done[r["state"]] += 1
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
        """jobs.create {input_file_id, endpoint, completion_window, metadata, idempotency_key}:
        the job is committed (fsynced) before this returns. A retry with the key of an earlier
        job answers that job if it asked the same, and is refused (409) if not."""
        new = check_create(self.store, args)
        if isinstance(new, str):   # a retry of the job created first with its idempotency key
            return self.view(self.store.get_job(new))
        job_id, now = f"batch_{uuid.uuid4().hex[:24]}", int(self.clock())
        self.store.create_job(job_id, new.file, new.endpoint, new.window, new.metadata, now, now + new.window_s,
                              new.idem)
        self.active.append(job_id)
        self.wakeup.set()
        log.info("job %s accepted: %d request(s) from %s", job_id, new.file["lines"], new.file["id"])
        return self.view(self.store.get_job(job_id))

    def cancel(self, args: dict) -> dict | None:
        """jobs.cancel {id}: stop feeding, abort what runs; idempotent on finished jobs."""
        job = self.store.get_job(args.get("id")) if isinstance(args.get("id"), str) else None
        if job is None:
            return None
        if job["status"] == "in_progress":
            self.store.set_status(job["id"], "cancelling", int(self.clock()))
            self._stop(job["id"], "cancelled")
        return self.view(self.store.get_job(job["id"]))

    def expire(self, job_id: str) -> None:
        """The job's completion window has passed: it ends as expired (OpenAI's status)."""
        job = self.store.get_job(job_id)
        if job is not None and job["status"] == "in_progress":
            self._stop(job_id, "expired")

    def _stop(self, job_id: str, state: str) -> None:
        """End a job early: abort what runs; every unfinished line ends in `state`."""
        for rid in [rid for rid, f in self.flights.items() if f.job_id == job_id]:
            del self.flights[rid]
            self.front.abort(protocol.Abort(request_id=rid, reason=f"batch job {state}"))
        self.store.stop_unfinished(job_id, state)
        self.store.set_status(job_id, state, int(self.clock()))
        self._retire(job_id)
        log.info("job %s %s", job_id, state)

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
