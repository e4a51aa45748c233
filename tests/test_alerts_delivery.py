"""Alert delivery (kernel/alert_delivery.py): real commands and a real HTTP receiver; the
tests poll for what arrives, with generous deadlines, and never sleep-and-assert."""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from llmos import protocol
from llmos.kernel.alert_delivery import AlertDelivery, check_targets, delivery_of


def alert(state="firing", rule="Kv") -> protocol.Alert:
    return protocol.Alert(rule=rule, state=state, severity="warning", labels={"engine": "m-0"}, value=0.97,
                          threshold=0.95, condition="llmos_kv_cache_usage_ratio > 0.95", summary="m-0 at 0.97",
                          active_since=1.0, fired_at=2.0, resolved_at=None)


def wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


def python(code: str) -> str:
    return f"{sys.executable} -c {json.dumps(code)}"


@pytest.fixture
def closing():
    made = []
    yield lambda d: made.append(d) or d
    for d in made:
        d.close()


def test_a_command_gets_the_alert_on_stdin_and_in_its_environment(tmp_path, closing):
    out = tmp_path / "got"
    code = ("import json, os, sys; body = sys.stdin.read(); "
            f"open({str(out)!r}, 'a').write(json.dumps([body, os.environ['LLMOS_ALERT'], "
            "os.environ['LLMOS_ALERT_STATE'], os.environ.get('LLMOS_STORAGE_KEY')]) + '\\n')")
    d = closing(AlertDelivery(command=python(code)))
    d.deliver(alert())
    d.deliver(alert("resolved"))
    wait_for(lambda: d.delivered == 2, what="two deliveries")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line[2] for line in lines] == ["firing", "resolved"]
    body, env_body, _, secret = lines[0]
    assert json.loads(body) == json.loads(env_body) == protocol.plain(alert()) and secret is None


def test_a_failing_command_is_tried_a_bounded_number_of_times(tmp_path, closing):
    tries = tmp_path / "tries"
    code = f"open({str(tries)!r}, 'a').write('x'); raise SystemExit(3)"
    d = closing(AlertDelivery(command=python(code), attempts=3, backoff_s=0.01))
    d.deliver(alert())
    wait_for(lambda: d.failed == 1, what="given up")
    assert tries.read_text() == "xxx" and d.delivered == 0


def test_a_command_past_its_timeout_is_killed_and_counts_as_a_failure(closing):
    d = closing(AlertDelivery(command=python("import time; time.sleep(60)"), attempts=1, timeout_s=0.5))
    d.deliver(alert())
    wait_for(lambda: d.failed == 1, what="timed out")


def test_a_full_queue_drops_the_newest_and_never_waits(tmp_path, closing):
    gate = tmp_path / "gate"
    code = f"import os, time; [time.sleep(0.02) for _ in iter(lambda: os.path.exists({str(gate)!r}), True)]"
    d = closing(AlertDelivery(command=python(code), max_queue=1, attempts=1))
    d.deliver(alert())
    wait_for(lambda: d.queue.empty(), what="the worker took the first")   # it is running now, blocked
    d.deliver(alert("resolved"))   # waits in the queue
    d.deliver(alert("firing", "Other"))   # no room: dropped at once
    assert d.dropped == 1
    gate.touch()
    wait_for(lambda: d.delivered == 2, what="the two kept")


class Receiver(BaseHTTPRequestHandler):
    answers: list = []
    bodies: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append((self.headers["Content-Type"], json.loads(body)))
        status = type(self).answers.pop(0) if type(self).answers else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.answers, Receiver.bodies = [], []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Receiver
    server.shutdown()
    server.server_close()


def test_a_webhook_is_retried_after_a_5xx(receiver, closing):
    url, got = receiver
    got.answers = [503, 500]
    d = closing(AlertDelivery(webhook=url, attempts=3, backoff_s=0.01))
    d.deliver(alert())
    wait_for(lambda: d.delivered == 1, what="delivered on the third try")
    assert len(got.bodies) == 3 and got.bodies[-1] == ("application/json", protocol.plain(alert()))


def test_a_webhook_that_refuses_with_a_4xx_is_not_retried(receiver, closing):
    url, got = receiver
    got.answers = [404]
    d = closing(AlertDelivery(webhook=url, attempts=3, backoff_s=0.01))
    d.deliver(alert())
    wait_for(lambda: d.failed == 1, what="given up")
    assert len(got.bodies) == 1


def test_an_unreachable_webhook_fails_after_its_tries(closing):
    d = closing(AlertDelivery(webhook="http://127.0.0.1:9/hook", attempts=2, backoff_s=0.01, timeout_s=2))
    d.deliver(alert())
    wait_for(lambda: d.failed == 1, what="given up")


def test_bad_targets_are_named_and_the_kernel_then_delivers_nothing():
    with pytest.raises(ValueError, match="alert_webhook: 'ftp://x' is not an http"):
        check_targets(None, "ftp://x")
    with pytest.raises(ValueError, match="alert_command: No closing quotation"):
        check_targets("notify 'oops", None)
    assert not delivery_of("notify 'oops", None).enabled
    nothing = AlertDelivery()
    nothing.deliver(alert())
    assert nothing._thread is None and nothing.queue.empty()
