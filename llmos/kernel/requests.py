"""A request's state in the kernel, with checked transitions.

The kernel is the only writer of this state. Token ids are the source of truth: a
restarted driver is given what it needs from here (design.md, rule 1).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from llmos import names, protocol
from llmos.kernel.policy import Priority
from llmos.sampling_params import SamplingParams


class State(enum.Enum):
    """llmos/names.py says what each state means (the names the kernel reports)."""
    TOKENIZING = names.TOKENIZING
    FORKING = names.FORKING
    WAITING = names.WAITING
    RUNNING = names.RUNNING
    FINISHING = names.FINISHING
    DONE = names.DONE


_ALLOWED = {
    State.TOKENIZING: {State.WAITING, State.DONE},
    State.FORKING: {State.WAITING, State.FINISHING, State.DONE},
    State.WAITING: {State.RUNNING, State.FINISHING, State.DONE},
    State.RUNNING: {State.WAITING, State.FINISHING, State.DONE},
    State.FINISHING: {State.DONE},
    State.DONE: set(),
}


@dataclass(eq=False)
class KVState:
    """Where a request's KV lives. Written only by the KV layers: KVCacheManager (attach_prefix,
    allocate_slots, commit, fork, free), SwapSpace (swap out and in) and the Scheduler (advance
    num_computed after a step, reset it to recompute)."""
    num_computed: int = 0             # tokens whose KV is in the pool
    blocks: list[int] = field(default_factory=list)          # the block table, in order
    block_hashes: list[int] = field(default_factory=list)    # chained hashes of full blocks (memo)
    cached_blocks: int = 0            # leading blocks of `blocks` registered in the prefix cache
    host_blocks: list[int] = field(default_factory=list)     # KV swapped out to the host pool
    swapped: bool = False             # its KV is on the host (host_blocks), none on the device
    # Prompt tokens whose KV came from the prefix cache when it first started (the Scheduler
    # sets it once; a recompute after preemption does not count): usage's cached_tokens.
    cached_prompt_tokens: int | None = None


@dataclass
class DetokProgress:
    """How far the tokenizer driver has got with a request's output. Written only by FrontDoor."""
    epoch: int = -1                   # tokenizer incarnation that holds our detok state
    sent: int = 0                     # output tokens handed to the tokenizer
    acked: int = 0                    # output tokens whose text came back


@dataclass
class SchedState:
    """When a request arrived, queued and ran, and its deadlines. Set at creation by FrontDoor,
    then written only by the Scheduler; the policy reads it to order and protect requests."""
    arrival: float = field(default_factory=time.monotonic)
    queued_at: float = 0.0            # when it last entered the waiting queue (aging counts from here)
    started_at: float | None = None   # when it was last admitted to the running batch
    preemptions: int = 0
    timeout_s: float | None = None    # total deadline from arrival
    queue_timeout_s: float | None = None   # deadline for first admission


@dataclass
class Output:
    """What a request has generated. Written only by the Scheduler (update_from_output and
    finish_requests); FrontDoor reads it to stream text."""
    ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)   # per token: [logprob, [[id, logprob], ...]]
    hidden_tail: int = 0              # trailing tokens not rendered (a stop token)
    finish_reason: str | None = None
    first_token_at: float | None = None


@dataclass(eq=False)
class Request:
    id: str
    seq_id: int                       # compact numeric id used on the model bus
    model: str
    tenant: str
    params: SamplingParams
    engine: str = ""                  # the engine (replica, version) it is bound to at submit
    prompt: str | None = None
    messages: list | None = None
    tools: list | None = None         # chat: the declared tools, sent with every Encode of it
    prompt_ids: list[int] = field(default_factory=list)
    state: State = State.TOKENIZING
    kv: KVState = field(default_factory=KVState)
    sched: SchedState = field(default_factory=SchedState)
    output: Output = field(default_factory=Output)
    max_tokens: int = 0               # resolved at admission
    priority: Priority = field(default_factory=lambda: Priority(1, 0))
    client: str = "io"                # the io driver that submitted it
    owner: str = "kernel"             # the principal that submitted it (kernel/auth.py): who may see and cancel it
    client_request_id: str | None = None   # the client's X-Request-Id: unique only among its owner's requests
    keep_alive_s: float | None = None  # how long its model stays loaded after it (None: the model's default)
    group: str | None = None          # n > 1: the client's request id (ours is "<group>#<index>")
    index: int = 0                    # which choice of the group this is
    forks: list = field(default_factory=list)   # choice 0 only: the FORKING choices it will fork
    detok: DetokProgress = field(default_factory=DetokProgress)

    @property
    def client_id(self) -> str:
        """The id the client knows this request by."""
        return self.group or self.id

    @property
    def shown_id(self) -> str:
        """What its owner calls it: the X-Request-Id it gave (choice i: "<id>#i"), else our id."""
        if self.client_request_id is None:
            return self.id
        return f"{self.client_request_id}#{self.index}" if self.index else self.client_request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output.ids)

    def token_at(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output.ids)[start:end]

    def to(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"request {self.id}: illegal transition {self.state.name} -> {new.name}")
        self.state = new

    @property
    def display_state(self) -> str:
        if self.state is State.WAITING and self.kv.swapped:
            return names.SWAPPED
        if self.state is State.WAITING and self.sched.preemptions:
            return names.PREEMPTED
        return self.state.value

    def summary(self) -> protocol.RequestSummary:
        return protocol.RequestSummary(
            id=self.shown_id, kernel_id=self.id if self.client_request_id else None,
            model=self.model, tenant=self.tenant, state=self.display_state,
            prompt_tokens=len(self.prompt_ids), output_tokens=len(self.output.ids), blocks=len(self.kv.blocks),
            preemptions=self.sched.preemptions, priority=self.priority.name,
            waited_s=round((self.sched.started_at or time.monotonic()) - self.sched.arrival, 3),
            age_s=round(time.monotonic() - self.sched.arrival, 3))
