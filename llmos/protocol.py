"""Every message that crosses the llmos bus, declared once: the contract between the kernel
and its drivers. How a message is written to frames and checked when read (the wire format,
`encode`, `decode`, `BadMessage`) is llmos/wire.py; its names are re-exported here, so this
module is the only one anyone imports.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any

import numpy as np

from llmos.wire import (  # noqa: F401  (re-exported: the protocol's one import)
    MAX_ARRAY_DIMS, PROTOCOL_VERSION, BadMessage, Message, Unencodable, decode, encode, i32, item, message, plain,
    registered_messages,
)


# ---------------------------------------------------------------- driver lifecycle

@message(0x01)
class Hello(Message):
    """driver -> kernel, first message after connecting."""
    role: str          # "model" | "tokenizer" | "io"
    name: str          # the driver's name in the process table
    pid: int


@item
class ModelInfo:
    """What a loaded model driver tells the kernel: the KV geometry its pool must have,
    the limits requests are checked against, and where the tokenizer finds the model."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str                 # of the KV pool, a torch dtype name ("bfloat16")
    vocab_size: int
    max_model_len: int
    weight_bytes: int
    eos_token_ids: list        # ints
    model_type: str            # transformers' config.model_type
    model_dir: str             # the prepared Hugging Face directory (the tokenizer driver loads it)


@item
class TokenizerInfo:
    vocab_size: int
    eos_token_id: int | None


@item
class IoInfo:
    socket: str                # the API socket it serves
    pid: int


READY_INFO = {"model": ModelInfo, "tokenizer": TokenizerInfo, "io": IoInfo}   # driver role -> its info


@message(0x02)
class Ready(Message):
    """driver -> kernel: loaded and able to work. Exactly one info is set, the one of the
    driver's role (READY_INFO)."""
    name: str
    model: ModelInfo | None = None
    tokenizer: TokenizerInfo | None = None
    io: IoInfo | None = None

    def __post_init__(self):
        if sum(x is not None for x in (self.model, self.tokenizer, self.io)) != 1:
            raise ValueError("Ready carries exactly one of model, tokenizer, io")

    @property
    def info(self) -> ModelInfo | TokenizerInfo | IoInfo:
        return self.model or self.tokenizer or self.io


@message(0x03)
class Heartbeat(Message):
    """driver -> kernel, every second; silence means the driver is hung."""
    name: str


@message(0x04)
class Shutdown(Message):
    """kernel -> driver: exit cleanly now."""
    reason: str


@message(0x05)
class DriverError(Message):
    """driver -> kernel: a failure the driver cannot recover from (e.g. model will not load)."""
    name: str
    error: str


# ---------------------------------------------------------------- kernel <-> model driver

@message(0x10)
class MapKVPool(Message):
    """kernel -> model driver: map the kernel-owned KV pool. Layout of the pool file:
    [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim] of `dtype`.
    The host swap pool (if any) has the same layout with host_blocks blocks, in host memory."""
    path: str
    device: str
    dtype: str
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    host_path: str | None = None
    host_blocks: int = 0
    cuda_ipc: list | None = None       # device != "cpu": the kernel allocation's CUDA IPC handle (8 fields)


@message(0x11)
class PoolMapped(Message):
    name: str
    error: str | None


@item
class LogitsControls:
    """What the sampler needs to change one sequence's logits (StepPlan.controls): only the
    sequences that asked for a penalty, a logit bias or min_p carry one. `row` is its index in
    the plan (a row with sample == 1). The token lists are what the kernel knows; the driver
    keeps nothing, so a restarted driver samples exactly as the dead one would have:
    output_ids are the tokens generated so far (sent only with a penalty on), prompt_ids the
    prompt (sent only with repetition_penalty != 1). bias_ids[i] gets bias_values[i] added."""
    row: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    output_ids: list       # ints
    prompt_ids: list       # ints
    bias_ids: list         # ints
    bias_values: list      # floats


@item
class GrammarRow:
    """One sampled row's output constraint (StepPlan.grammars): only the rows of sequences
    asking for structured output carry one. `kind` and `spec` are grammar_spec's, `key` its
    cache key; output_ids are every token generated so far, so that a driver that never saw
    the sequence (a restart) rebuilds its matcher from them: the driver's matchers are a
    cache, the kernel's tokens the truth."""
    row: int
    key: str
    kind: str
    spec: str
    output_ids: list       # ints


FOLLOWED_TOKEN = -1   # StepPlan.tokens of a plan that follows another: filled in by the driver


@message(0x12, arrays=("seq_ids", "num_new", "start_pos", "tokens", "block_tables", "sample",
                       "temperature", "top_p", "top_k", "seed", "gen_index", "top_logprobs",
                       "swap_out", "swap_in", "copy"))
class StepPlan(Message):
    """kernel -> model driver: one forward pass over a packed batch.

    Sequence i contributes tokens[sum(num_new[:i]) : sum(num_new[:i+1])] at positions
    start_pos[i].. ; its KV lives in block_tables[i] (padded with -1). Sequences with
    sample[i] == 1 get a next token sampled with their parameters. seed[i] < 0 means
    unseeded; gen_index[i] (tokens generated so far) makes seeded sampling stateless.
    top_logprobs[i] < 0 means no logprobs. Before the forward pass the driver copies
    swap_out [k, 2] (device block -> host block), then swap_in [k, 2] (host -> device),
    then copy [k, 2] (device block -> device block: copy-on-write of shared blocks).
    controls: penalties, logit bias and min_p of the rows that use them (LogitsControls).
    follows > 0 (kernel/run_ahead.py): sent while step `follows` runs; each sequence has one new
    token, given as FOLLOWED_TOKEN: the one the driver samples for it in that step."""
    step_id: int
    seq_ids: np.ndarray
    num_new: np.ndarray
    start_pos: np.ndarray
    tokens: np.ndarray
    block_tables: np.ndarray
    sample: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    seed: np.ndarray
    gen_index: np.ndarray
    top_logprobs: np.ndarray
    swap_out: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    swap_in: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    copy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))   # (src, dst) blocks
    controls: list[LogitsControls] = field(default_factory=list)   # empty unless a sequence asked for them
    grammars: list[GrammarRow] = field(default_factory=list)       # empty unless a sequence asked for one
    follows: int = 0                                               # 0: every token is given


@message(0x13, arrays=("seq_ids", "tokens", "logprobs", "top_ids", "top_lps"))
class StepResult(Message):
    """model driver -> kernel: one sampled token per sequence of the plan that had sample == 1,
    in plan order. top_ids/top_lps are [n, k] with k the largest top_logprobs asked (0 if none);
    rows that asked for no logprobs carry NaN logprobs. forward_ms is the whole execute time
    (validation, swaps, forward, sampling)."""
    step_id: int
    seq_ids: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_lps: np.ndarray
    forward_ms: float
    # Structured output: sampled sequences whose grammar the driver is still compiling (their
    # token is void; the kernel plans their last token again), and [seq_id, error] of those
    # whose grammar failed (the kernel fails that request alone, 400).
    held: list = field(default_factory=list)             # seq ids
    grammar_errors: list = field(default_factory=list)   # [seq_id, message]


@message(0x14)
class StepFailed(Message):
    """model driver -> kernel: the plan could not run; its sequences fail with `error`."""
    step_id: int
    error: str


# ---------------------------------------------------------------- kernel <-> tokenizer driver

@message(0x20)
class Encode(Message):
    """kernel -> tokenizer: turn a prompt (text) or a chat (messages) into token ids. The
    options' defaults are a generation request's; /tokenize may change them (vLLM's fields).
    add_special_tokens None: True for a prompt, False for a chat (its template adds them)."""
    request_id: str
    prompt: str | None
    messages: list | None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: list | None = None          # chat: OpenAI's tools, for the template (openai_format/tools.py's shape)


@message(0x21, arrays=("token_ids",))
class Encoded(Message):
    """tokenizer -> kernel. `error` set means the prompt could not be encoded (a 400).
    token_strs: each id's token string, when the Encode asked for them."""
    request_id: str
    token_ids: np.ndarray
    error: str | None
    token_strs: list | None = None


@item
class DetokItem:
    """One request's new output tokens for the tokenizer."""
    rid: str
    ids: list                  # new token ids
    prior: list | None         # all earlier output ids: sent when this tokenizer has no state for the request
    lp: list | None            # per id: [logprob, [[id, logprob], ...]]; None: no logprobs asked
    stop: list | None          # the stop strings, with the item that starts the state (prior set); else None
    finish: str | None         # the request ends with this item ("stop", "length", ...); "abort": forget it


@item
class TextDelta:
    """The text of one DetokItem."""
    rid: str
    text: str
    n: int                     # tokens this text covers
    lp: list | None            # OpenAI-shaped logprob entries, one per token
    finish: str | None
    stop_hit: bool             # a stop string ended the text here


@message(0x22)
class Detokenize(Message):
    """kernel -> tokenizer: new tokens, one item per request."""
    items: list[DetokItem]


@message(0x23)
class TextDeltas(Message):
    """tokenizer -> kernel: text for the items it could render."""
    items: list[TextDelta]


@message(0x24, arrays=("token_ids",))
class Decode(Message):
    """kernel -> tokenizer: the text of these ids, at once and keeping no state (/detokenize;
    the streaming path is Detokenize). Special tokens are kept, as vLLM's /detokenize does."""
    request_id: str
    token_ids: np.ndarray


@message(0x25)
class Decoded(Message):
    """tokenizer -> kernel: the answer to the Decode with the same id; `error` set: it failed."""
    request_id: str
    text: str
    error: str | None


# ---------------------------------------------------------------- kernel <-> io driver

@item
class Credentials:
    """Who sent an HTTP request, as the io driver saw it; the kernel decides what it may do
    (kernel/auth.py). The key itself never crosses the bus, only its SHA-256."""
    transport: str             # "unix" | "tcp"
    uid: int | None = None     # the Unix socket peer's (SO_PEERCRED); None over TCP
    gid: int | None = None
    key_sha256: str | None = None   # hex digest of the Authorization: Bearer secret, if any


@message(0x30)
class Submit(Message):
    """io -> kernel: a new generation request. `params` are the validated sampling
    parameters (see llmos.sampling_params); the kernel validates them again."""
    request_id: str
    model: str
    prompt: str | None
    messages: list | None
    prompt_token_ids: list | None
    params: dict
    tenant: str
    priority: Any = None               # "batch", "batch:3", an int (level in the tenant's class) or None
    timeout_s: float | None = None     # total deadline; None: the server default
    queue_timeout_s: float | None = None
    n: int = 1                         # choices to generate (OpenAI's n); they share the prompt's KV
    keep_alive_s: float | None = None  # its model stays loaded this long after it; < 0: forever; None: default
    auth: Credentials | None = None    # None only from an io driver that predates access control: refused
    # The client's own X-Request-Id. request_id is the io driver's, unique and unguessable; the
    # client's id is unique only among its principal's requests (ps and cancel know it by it).
    client_request_id: str | None = None
    tools: list | None = None          # chat: the declared tools; they travel to the template with the Encode


@message(0x31)
class Accepted(Message):
    """kernel -> io: the request is admitted; outputs follow."""
    request_id: str
    prompt_tokens: int


@message(0x32)
class Rejected(Message):
    """kernel -> io: the request ends with an error. status is the HTTP status to answer."""
    request_id: str
    status: int
    code: str
    message: str
    param: str | None
    retry_after: float | None = None   # seconds, for 429 (quota) and 503 answers


@item
class OutputItem:
    """New output of one choice of one request."""
    rid: str                   # the id the client knows the request by
    index: int                 # the choice, 0..n-1
    text: str
    n: int                     # tokens covered
    ids: list                  # the token ids covered
    lp: list | None            # OpenAI-shaped logprob entries
    finish: str | None         # set on the choice's last item
    usage: dict | None         # {"prompt_tokens", "completion_tokens", "cached_tokens"} of that choice, with
                               # its last item; cached_tokens: prompt tokens whose KV the prefix cache held


@message(0x33)
class Outputs(Message):
    """kernel -> io, one per step. A request is done when each of its n choices has had an
    item with `finish` set."""
    items: list[OutputItem]


@message(0x34)
class Abort(Message):
    """io -> kernel: the client went away or cancelled; free the request now."""
    request_id: str
    reason: str


@message(0x35)
class Query(Message):
    """io -> kernel: read-only admin query ("models", "ps", "health", "memory", the jobs'
    and files' queries)."""
    query_id: str
    what: str
    args: dict
    auth: Credentials | None = None


# The answers' records. The io driver serialises them (`plain`) to the admin API's JSON,
# field for field, so their fields and order are that API's.

@item
class HealthReport:
    status: str                # "ok" | "starting" | "draining" | "degraded"
    pid: int
    uptime_s: float
    device: str
    failed_drivers: list       # names of drivers out of restarts
    dead_loops: dict           # kernel loop -> why it ended
    step_crashes: int
    bad_step_results: int
    models: dict               # model -> "ready" | "loading"
    requests_in_flight: int
    rejected_bus_messages: int


@item
class ModelEntry:
    id: str
    created: int               # unix time the kernel started
    owned_by: str
    max_model_len: int | None  # None while the model loads
    ready: bool
    state: str = "loaded"      # names.MODEL_STATES: unloaded | loading | loaded | unloading | failed
    replicas: int = 1          # engines serving it (0 when not loaded)
    version: int | None = None # registry version it serves (None: a path, or not loaded)


@item
class ProcessRow:
    """One row of the process table (the kernel's own first)."""
    name: str
    role: str
    state: str                 # a supervisor DState value
    pid: int | None            # None when not running
    restarts: int
    uptime_s: float | None
    last_error: str | None


@item
class RequestSummary:
    """One request of the kernel's table."""
    id: str
    model: str
    tenant: str
    state: str                 # a request State value, or "preempted" / "swapped" (requests.DISPLAY_STATES)
    prompt_tokens: int
    output_tokens: int
    blocks: int
    preemptions: int
    priority: str              # "interactive", "batch:3", ...
    waited_s: float
    age_s: float
    kernel_id: str | None = None   # our id when the client named it (`id` is then its X-Request-Id)


@item
class ProcessReport:
    """The answer to "ps"."""
    processes: list[ProcessRow]
    requests: list[RequestSummary]
    scheduler: dict            # model -> its policy's snapshot (the policy's own shape)


@item
class MemoryReport:
    """One loaded model's KV memory; its nested statistics keep their owners' shapes."""
    device: str
    block_size: int
    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached_free: int
    blocks_shared: int
    prefix_cache: dict         # KVCacheManager.stats()
    accounting: dict           # how the pool was sized
    pool_bytes: int
    swap: dict | None          # SwapSpace.stats(); None without a host tier
    scheduler: dict            # the policy's snapshot
    block_bytes: int
    preemptions: int
    requests: dict             # request id -> blocks held
    steps: dict                # StepStats
    recoveries: list           # per model driver loss: recovery time, recomputed tokens
    integrity: str             # "ok" or "broken: why"


@item
class MetricSeries:
    """One labelled series of a MetricFamily."""
    labels: list               # its label values (strings), in the order of the family's label_names
    value: float               # a counter's total, a gauge's value; a histogram's sum of observations
    buckets: list | None       # a histogram's cumulative counts: one per bound, then +Inf (its count)


@item
class MetricFamily:
    """One metric as Prometheus names it, its figures as numbers (the io driver renders the text)."""
    name: str                  # counters end in _total; histograms have no suffix
    kind: str                  # "counter" | "gauge" | "histogram"
    help: str
    label_names: list          # strings
    bounds: list | None        # a histogram's bucket upper bounds, ascending (+Inf implied)
    series: list[MetricSeries]


@item
class MetricsSnapshot:
    """The answer to "metrics": the kernel's figures at one moment (kernel/metrics.py)."""
    taken_at: float            # the kernel's wall clock, Unix seconds
    families: list[MetricFamily]


@item
class Alert:
    """One alert: a rule (kernel/alert_rules.py) holding for one set of its labels (kernel/alerts.py)."""
    rule: str
    state: str                 # "pending" | "firing" | "resolved"
    severity: str              # "info" | "warning" | "critical"
    labels: dict               # label -> value: what it is about ({"driver": "io"})
    value: float | None        # the figure at the last evaluation (None: it has no value now)
    threshold: float
    condition: str             # the rule in one line: increase(llmos_driver_restarts_total[10m]) > 3
    summary: str
    active_since: float        # Unix time the condition began to hold
    fired_at: float | None
    resolved_at: float | None


@item
class AlertReport:
    """The answer to "alerts"."""
    active: list[Alert]        # firing, then pending
    recent: list[Alert]        # resolved, newest first
    rules: dict                # rule name -> its condition in one line
    failing: dict              # rule name -> why its last evaluation failed


@message(0x36)
class QueryReply(Message):
    """kernel -> io: the answer to the Query or Command with the same id. At most one answer
    field is set: `error` when the kernel refused or failed; else the record of the query
    (health, models, ps, memory: None for a model still loading, metrics, alerts); else `data`, the jobs' and
    files' answers and the commands', JSON-shaped (OpenAI's objects, kernel/jobs/views.py)."""
    query_id: str
    error: str | None = None
    status: int | None = None  # with `error`: 401 or 403 when the caller may not ask this
    health: HealthReport | None = None
    models: list[ModelEntry] | None = None
    ps: ProcessReport | None = None
    memory: dict[str, MemoryReport | None] | None = None
    metrics: MetricsSnapshot | None = None
    alerts: AlertReport | None = None
    data: Any = None

    def __post_init__(self):
        answers = (self.error, self.health, self.models, self.ps, self.memory, self.metrics, self.alerts, self.data)
        if sum(x is not None for x in answers) > 1:
            raise ValueError("QueryReply carries at most one answer")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def answer(self):
        """What was answered when ok: the record, or `data`."""
        records = (self.health, self.models, self.ps, self.memory, self.metrics, self.alerts)
        return next((x for x in records if x is not None), self.data)


@message(0x37)
class Command(Message):
    """io -> kernel: an admin action that changes state ("restart", "jobs.create", ...).
    Answered with a QueryReply carrying the same id."""
    query_id: str
    what: str
    args: dict
    auth: Credentials | None = None


ALL_MESSAGES: tuple[type, ...] = registered_messages()
