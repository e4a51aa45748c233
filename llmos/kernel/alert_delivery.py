"""Alert delivery: each alert that fires or resolves goes to the operator's command and/or
webhook, from one worker thread, never from the kernel's loop.

  alert_command   run without a shell (shlex-split), the alert as JSON on stdin and in
                  $LLMOS_ALERT, with $LLMOS_ALERT_RULE, $LLMOS_ALERT_STATE, $LLMOS_ALERT_SEVERITY;
                  exit 0 is delivered. Its environment is PATH, HOME, LANG and LLMOS_HOME only:
                  the daemon's secrets (a storage key, say) stay with the daemon.
  alert_webhook   POST of the same JSON (http or https); a 2xx is delivered, a 4xx is not
                  retried (the receiver refuses it), anything else is.

Each gets `attempts` tries, `timeout_s` each, `backoff_s` doubling between them. The queue
is bounded: when the receiver is so slow that it fills, a new alert is dropped and logged
(and counted in `dropped`) rather than held without bound or waited for.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from llmos import protocol

log = logging.getLogger(__name__)
ATTEMPTS, TIMEOUT_S, BACKOFF_S, MAX_QUEUE = 3, 10.0, 1.0, 100
ENV_KEPT = ("PATH", "HOME", "LANG", "LLMOS_HOME")


def check_targets(command: str | None, webhook: str | None) -> tuple[list[str] | None, str | None]:
    """(argv, url) from the config, or ValueError naming the key."""
    argv = None
    if command:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(f"alert_command: {exc}") from None
    if webhook:
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"alert_webhook: {webhook!r} is not an http or https URL")
    return argv or None, webhook or None


class AlertDelivery:
    def __init__(self, command: str | None = None, webhook: str | None = None, attempts: int = ATTEMPTS,
                 timeout_s: float = TIMEOUT_S, backoff_s: float = BACKOFF_S, max_queue: int = MAX_QUEUE):
        self.argv, self.webhook = check_targets(command, webhook)
        self.attempts, self.timeout_s, self.backoff_s = attempts, timeout_s, backoff_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.delivered = self.failed = self.dropped = 0
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.argv or self.webhook)

    def deliver(self, alert: protocol.Alert) -> None:
        """Hand one alert over; returns at once (called on the kernel's loop)."""
        if not self.enabled or self._closing.is_set():
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="alert-delivery", daemon=True)
            self._thread.start()
        try:
            self.queue.put_nowait(protocol.plain(alert))
        except queue.Full:
            self.dropped += 1
            log.error("alert %s %s not delivered: %d alerts already wait for delivery", alert.rule, alert.state,
                      self.queue.maxsize)

    def close(self, timeout: float = 2.0) -> None:
        """Stop after what is being sent now (the kernel is shutting down; queued ones are dropped)."""
        self._closing.set()
        if self._thread is not None:
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout)

    # ------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        while True:
            alert = self.queue.get()
            if alert is None or self._closing.is_set():
                return
            body = json.dumps(alert).encode()
            for target, send in (("command", self._run_command if self.argv else None),
                                 ("webhook", self._post if self.webhook else None)):
                if send is not None:
                    self._with_retries(target, send, alert, body)

    def _with_retries(self, target: str, send, alert: dict, body: bytes) -> None:
        problem = None
        for attempt in range(self.attempts):
            if attempt:
                if self._closing.wait(self.backoff_s * 2 ** (attempt - 1)):
                    return
            try:
                problem = send(alert, body)
            except Exception as exc:   # the worker outlives any one receiver's trouble
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                self.delivered += 1
                return
            if problem.startswith("final:"):
                break
        self.failed += 1
        log.error("alert %s %s: the %s failed %s: %s", alert["rule"], alert["state"], target,
                  "for good" if problem.startswith("final:") else f"{self.attempts} times", problem.removeprefix("final: "))

    def _run_command(self, alert: dict, body: bytes) -> str | None:
        env = {k: os.environ[k] for k in ENV_KEPT if k in os.environ}
        env.update(LLMOS_ALERT=body.decode(), LLMOS_ALERT_RULE=alert["rule"], LLMOS_ALERT_STATE=alert["state"],
                   LLMOS_ALERT_SEVERITY=alert["severity"])
        try:
            done = subprocess.run(self.argv, input=body, env=env, capture_output=True, timeout=self.timeout_s,
                                  close_fds=True)
        except subprocess.TimeoutExpired:
            return f"no exit within {self.timeout_s:g} s (killed)"
        except OSError as exc:
            return f"final: cannot run {self.argv[0]!r}: {exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-300:]
            return f"exit code {done.returncode}" + (f": {tail}" if tail else "")
        return None

    def _post(self, alert: dict, body: bytes) -> str | None:
        req = urllib.request.Request(self.webhook, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "llmosd-alerts"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read(1 << 16)
                return None
        except urllib.error.HTTPError as exc:
            return f"{'final: ' if 400 <= exc.code < 500 else ''}HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"


def delivery_of(command: str | None, webhook: str | None) -> AlertDelivery:
    """For the kernel at start: the configured delivery, or none (and an error in the log)
    when a target is bad; alerts still reach the log and `llmos alerts`."""
    try:
        return AlertDelivery(command, webhook)
    except ValueError as exc:
        log.error("alerts will not be delivered: %s", exc)
        return AlertDelivery()
