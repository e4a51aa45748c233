"""The fake kernel the io driver's tests run against (test_io_driver, test_io_limits,
test_client_cli): a zmq ROUTER speaking llmos.protocol in a thread, answering with the
kernel's own message and record types, and `io_stack`, which starts the real io driver
process against it."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

from llmos import protocol
from llmos.kernel.requests import State
from llmos.kernel.supervisor import DState
from llmos.paths import Paths

MODEL = "smollm2"
REPLY = ["Hello", " world", ",", " from", " llmos", "."]


def health_report(status: str = "ok") -> protocol.HealthReport:
    return protocol.HealthReport(status=status, pid=1, uptime_s=1.0, device="cpu", failed_drivers=[], dead_loops={},
                                 step_crashes=0, bad_step_results=0, models={MODEL: "ready"}, requests_in_flight=0,
                                 rejected_bus_messages=0)


def memory_report() -> protocol.MemoryReport:
    return protocol.MemoryReport(
        device="cpu", block_size=16, blocks_total=64, blocks_used=4, blocks_free=60, blocks_cached_free=0,
        blocks_shared=0, prefix_cache={"hit_rate": 0.0}, accounting={"kv_budget_bytes": 1 << 20}, pool_bytes=1 << 20,
        swap=None, scheduler={"policy": "fcfs"}, block_bytes=1 << 14, preemptions=0, requests={"cmpl-abc": 2},
        steps={"steps": 3}, recoveries=[], integrity="ok")


class FakeKernel:
    """Answers Query and Submit like the kernel would. Behaviour is chosen by the prompt
    (or last chat message): "slow" streams 2000 pieces 50 ms apart (100 s: long enough that a starved
    io process still sees its client leave before the reply could finish), "fail" fails after one
    output, "silent" never answers, "stall" is accepted and then never produces output."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.received: list[protocol.Message] = []
        self.cond = threading.Condition()
        # The kernel's own records and state names, so this fake cannot drift from what the kernel reports.
        self.health = health_report()
        self.ps = protocol.ProcessReport(
            processes=[protocol.ProcessRow(name="io", role="io", state=DState.RUNNING.value, pid=123, restarts=0,
                                           uptime_s=12.5, last_error=None)],
            requests=[protocol.RequestSummary(id="cmpl-abc", model=MODEL, tenant="local", state=State.RUNNING.value,
                                              prompt_tokens=51, output_tokens=7, blocks=2, preemptions=0,
                                              priority="interactive", waited_s=0.1, age_s=0.4)],
            scheduler={MODEL: {"policy": "fcfs"}})
        self.memory = {MODEL: memory_report(), "loading-model": None}
        self._due: list[tuple[float, str, protocol.Message]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(0)

    def wait_for(self, pred, timeout: float = 5.0):
        """The first received message satisfying pred, waiting up to timeout s (None if none)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.received:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def of(self, cls) -> list:
        with self.cond:
            return [m for m in self.received if isinstance(m, cls)]

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for item in [d for d in self._due if d[0] <= now]:
                self._due.remove(item)
                self.sock.send_multipart([item[1].encode(), *protocol.encode(item[2])])
            if self.sock.poll(10):
                frames = self.sock.recv_multipart()
                peer, msg = frames[0].decode(), protocol.decode(frames[1:])
                with self.cond:
                    self.received.append(msg)
                    self.cond.notify_all()
                self._answer(peer, msg)

    def _later(self, peer: str, msg, delay: float = 0.0) -> None:
        self._due.append((time.monotonic() + delay, peer, msg))

    def _answer(self, peer: str, msg) -> None:
        if isinstance(msg, protocol.Query):
            answers = {"health": self.health, "ps": self.ps, "memory": self.memory,
                       "models": [protocol.ModelEntry(id=MODEL, created=1700000000, owned_by="llmos",
                                                      max_model_len=2048, ready=True)]}
            answer = {msg.what: answers[msg.what]} if msg.what in answers else {"error": f"unknown query {msg.what}"}
            self._later(peer, protocol.QueryReply(query_id=msg.query_id, **answer))
        elif isinstance(msg, protocol.Submit):
            self._generate(peer, msg)
        elif isinstance(msg, protocol.Abort):
            self._due = [d for d in self._due if not (isinstance(d[2], protocol.Outputs)
                                                      and d[2].items[0].rid == msg.request_id)]

    def _generate(self, peer: str, msg: protocol.Submit) -> None:
        rid = msg.request_id
        if msg.model != MODEL:
            return self._later(peer, protocol.Rejected(rid, 404, "model_not_found",
                                                       f"model '{msg.model}' does not exist", "model"))
        text = msg.prompt if msg.prompt is not None else (msg.messages[-1]["content"] if msg.messages else "")
        if text == "silent":
            return
        self._later(peer, protocol.Accepted(rid, prompt_tokens=7))
        if text == "stall":
            return
        pieces, gap = (["tok"] * 2000, 0.05) if text == "slow" else (REPLY, 0.0)
        full = len(pieces)
        pieces = pieces[:msg.params.get("max_tokens") or full]
        finish = "length" if len(pieces) < full else "stop"
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            lp = None
            if msg.params.get("logprobs") is not None:
                lp = [{"token": piece, "logprob": -0.5, "bytes": list(piece.encode()),
                       "top_logprobs": [{"token": piece, "logprob": -0.5, "bytes": list(piece.encode())}]}]
            if text == "fail" and i == 1:
                return self._later(peer, protocol.Rejected(rid, 500, "step_failed", "model driver crashed", None),
                                   gap * i)
            # Choice c of n > 1 says its index in its text; the choices' items interleave.
            items = [protocol.OutputItem(rid=rid, index=c, text=piece + (f"/{c}" if msg.n > 1 else ""), n=1,
                                         ids=[], lp=lp, finish=finish if last else None,
                                         usage={"prompt_tokens": 7, "completion_tokens": len(pieces)} if last else None)
                     for c in reversed(range(msg.n))]
            self._later(peer, protocol.Outputs(items=items), gap * i)


@contextlib.contextmanager
def io_stack(home: Path, *options: str, timeout: float = 2.0):
    """A FakeKernel plus the real io driver process serving $home/run/llmos.sock; `options`
    are more of the io driver's command-line options (its limits)."""
    paths = Paths.from_env(home)
    paths.ensure()
    kernel = FakeKernel(paths.kernel_endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "llmos.drivers.io", "--endpoint", paths.kernel_endpoint,
                             "--name", "io", "--socket", str(paths.api_socket), "--timeout", str(timeout), *options])
    try:
        assert kernel.wait_for(lambda m: isinstance(m, protocol.Ready), 20), "io driver never became ready"
        yield kernel, proc, paths.api_socket
    finally:
        proc.terminate()
        proc.wait(10)
        kernel.close()
