"""Canary prompts for a new version: an in-kernel client (peer "@canary", like "@jobs") that
sends a few greedy prompts straight to one candidate engine and judges what comes back. A
version passes when every prompt produced text and ended normally."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from llmos import protocol

log = logging.getLogger(__name__)
PEER = "@canary"
PROMPTS = ("Say hello.", "What is 2 + 2?")
MAX_TOKENS = 8


@dataclass
class Trial:
    engine: str
    on_verdict: object                 # (engine, error or None) -> None
    left: set = field(default_factory=set)
    text: dict = field(default_factory=dict)
    failed: str | None = None


class Canary:
    def __init__(self, submit_to):
        self._submit_to = submit_to    # (engine id, peer, Submit) -> None: FrontDoor.submit_to
        self.trials: dict[str, Trial] = {}   # request id -> its trial
        self._ids = itertools.count(1)

    def start(self, model: str, engine: str, on_verdict) -> None:
        trial = Trial(engine, on_verdict)
        sends = [(f"canary-{engine}-{next(self._ids)}", prompt) for prompt in PROMPTS]
        for rid, _ in sends:   # all registered first: a submit may be answered (Rejected) at once
            trial.left.add(rid)
            trial.text[rid] = ""
            self.trials[rid] = trial
        for rid, prompt in sends:
            self._submit_to(engine, PEER, protocol.Submit(
                request_id=rid, model=model, prompt=None, prompt_token_ids=None, tenant="llmos-canary",
                messages=[{"role": "user", "content": prompt}], priority="interactive",
                params={"max_tokens": MAX_TOKENS, "temperature": 0.0}))

    def give_up(self, engine: str, why: str) -> None:
        """The candidate went away (or ran out of time) before answering."""
        for rid, trial in list(self.trials.items()):
            if trial.engine == engine:
                self._end(rid, why)

    def deliver(self, msg) -> None:
        """Kernel.local_clients[PEER]. Never raises."""
        try:
            if isinstance(msg, protocol.Rejected):
                self._end(msg.request_id, f"{msg.status} {msg.code}: {msg.message}")
            elif isinstance(msg, protocol.Outputs):
                for item in msg.items:
                    trial = self.trials.get(item.rid)
                    if trial is None:
                        continue
                    trial.text[item.rid] = trial.text.get(item.rid, "") + item.text
                    if item.finish is not None:
                        bad = None
                        if item.finish not in ("stop", "length"):
                            bad = f"it ended with {item.finish!r}"
                        elif not trial.text[item.rid].strip():
                            bad = "it answered with no text"
                        self._end(item.rid, bad)
        except Exception:
            log.exception("canary: could not handle %s", type(msg).__name__)

    def _end(self, rid: str, failure: str | None) -> None:
        trial = self.trials.pop(rid, None)
        if trial is None:
            return
        trial.left.discard(rid)
        if failure and trial.failed is None:
            trial.failed = f"canary prompt {rid}: {failure}"
        if not trial.left:
            log.info("canary of %s: %s", trial.engine, trial.failed or "passed")
            trial.on_verdict(trial.engine, trial.failed)
