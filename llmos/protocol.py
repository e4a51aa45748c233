"""Every message that crosses the llmos bus, declared once.

Wire format (one ZeroMQ multipart message):
    frame 0: one byte, the opcode
    frame 1: msgpack map {"v": PROTOCOL_VERSION, "f": {field: value}, "a": [[name, dtype, shape], ...]}
    frame 2..: raw bytes of each array field, in the order of "a" (no copy, no pickle)

`decode` never trusts a frame: unknown opcodes, wrong versions, missing or unknown
fields and wrongly typed fields raise `BadMessage`, which receivers count and log.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
_ARRAY_DTYPES = {"int32", "int64", "float32", "uint8"}
MAX_ARRAY_DIMS = 4


class BadMessage(ValueError):
    """A frame sequence that is not a valid message of this protocol version."""


class Unencodable(ValueError):
    """A message that cannot be written (a lone surrogate in a string, an int past 64
    bits, a value msgpack has no type for). Nothing was sent; the sender fails the
    request the message belongs to."""


class Message:
    OPCODE: ClassVar[int]
    ARRAYS: ClassVar[tuple[str, ...]] = ()


_REGISTRY: dict[int, type] = {}
_FIELD_TYPES: dict[type, dict[str, tuple]] = {}   # message or item class -> field -> accepted wire types
_ITEM_FIELDS: dict[type, dict[str, Any]] = {}     # message or item class -> its fields that hold items -> hint
_ITEMS: set[type] = set()


def item(cls):
    """Class decorator: a typed record inside a message. A field of a message or of another
    item may hold one (`X`), maybe one (`X | None`), a list (`list[X]`) or a map
    (`dict[str, X]`) of them; on decode each is checked field by field like the message
    itself, nested items included. Declare an item before the classes that hold it."""
    cls = dataclass(cls)
    _register_fields(cls)
    _ITEMS.add(cls)
    return cls


def message(opcode: int, arrays: tuple[str, ...] = ()):
    """Class decorator: make a dataclass a bus message with this opcode."""

    def wrap(cls):
        cls = dataclass(cls)
        if opcode in _REGISTRY:
            raise RuntimeError(f"opcode {opcode:#x} declared twice")
        cls.OPCODE, cls.ARRAYS = opcode, arrays
        _REGISTRY[opcode] = cls
        _register_fields(cls)
        return cls

    return wrap


def _register_fields(cls) -> None:
    hints = typing.get_type_hints(cls)
    for name, hint in hints.items():
        if _holds_items(hint) and not _one_shape(hint):
            raise TypeError(f"{cls.__name__}.{name}: a union may hold one item type and None, not {hint}")
    _FIELD_TYPES[cls] = {f.name: _accepted(hints[f.name]) for f in dataclasses.fields(cls)}
    _ITEM_FIELDS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if _holds_items(hints[f.name])}


def _holds_items(hint) -> bool:
    return hint in _ITEMS or any(_holds_items(arg) for arg in typing.get_args(hint))


def _one_shape(hint) -> bool:
    """No union of two item types (a decoder could not tell which one came)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in args if a is not type(None)]
        if len(args) != 1:
            return False
    return all(_one_shape(a) for a in args)


def _accepted(hint) -> tuple:
    """The runtime types a field of this annotation may hold after msgpack decoding."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _accepted(arg))
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (float, int)
    if hint is Any:
        return (object,)
    if hint is np.ndarray:
        return (np.ndarray,)
    if hint in _ITEMS:   # an item travels as a map of its fields
        return (dict,)
    return (origin or hint,)


def _is_a(value, accepted: tuple) -> bool:
    """isinstance, except that a bool is not an int (or a float) unless bool is accepted."""
    return isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted
                                                and object not in accepted)


def _to_wire(hint, value):
    """A value of a field that holds items, as it travels: items as maps of their fields."""
    if hint in _ITEMS:
        if not isinstance(value, hint):
            raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
        return {k: (_to_wire(_ITEM_FIELDS[hint][k], getattr(value, k)) if k in _ITEM_FIELDS[hint]
                    else getattr(value, k)) for k in _FIELD_TYPES[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _to_wire(next(a for a in args if a is not type(None)), value)
    if origin is list and isinstance(value, list):
        return [_to_wire(args[0], x) for x in value]
    if origin is dict and isinstance(value, dict):
        return {k: _to_wire(args[1], v) for k, v in value.items()}
    raise TypeError(f"expected {hint}, got {type(value).__name__}")


def _from_wire(where: str, hint, value):
    """The inverse of _to_wire, checking every level: BadMessage names the first bad place."""
    if hint in _ITEMS:
        return _decode_item(where, hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _from_wire(where, next(a for a in args if a is not type(None)), value)
    if origin is list and isinstance(value, list):
        return [_from_wire(f"{where}[{i}]", args[0], x) for i, x in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        if not all(_is_a(k, _accepted(args[0])) for k in value):
            raise BadMessage(f"{where}: unexpected key type")
        return {k: _from_wire(f"{where}[{k!r:.40}]", args[1], v) for k, v in value.items()}
    raise BadMessage(f"{where}: unexpected {type(value).__name__}")


def plain(value):
    """An item (or a list or map of items) as plain maps and lists, the form it travels in:
    what the io driver serialises to JSON."""
    if type(value) in _ITEMS:
        return _to_wire(type(value), value)
    if isinstance(value, list):
        return [plain(x) for x in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def encode(msg: Message) -> list[bytes]:
    """The frames of `msg`. Raises Unencodable (nothing is sent) for what cannot be written."""
    fields, arrays, frames = {}, [], []
    try:
        for f in dataclasses.fields(msg):
            value = getattr(msg, f.name)
            if f.name in msg.ARRAYS:
                arr = np.ascontiguousarray(value)
                if str(arr.dtype) not in _ARRAY_DTYPES:
                    raise TypeError(f"{f.name}: arrays of {arr.dtype} are not part of the protocol")
                arrays.append([f.name, str(arr.dtype), list(arr.shape)])
                frames.append(arr.data)
            elif f.name in _ITEM_FIELDS[type(msg)]:
                fields[f.name] = _to_wire(_ITEM_FIELDS[type(msg)][f.name], value)
            else:
                fields[f.name] = value
        head = msgpack.packb({"v": PROTOCOL_VERSION, "f": fields, "a": arrays}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:   # UnicodeEncodeError is a ValueError
        raise Unencodable(f"{type(msg).__name__}: {type(exc).__name__}: {exc}") from None
    return [bytes([msg.OPCODE]), head, *frames]


def decode(frames: list) -> Message:
    try:
        return _decode(frames)
    except BadMessage:
        raise
    except Exception as exc:  # whatever a hostile frame provokes, it is a bad message, never a crash
        raise BadMessage(f"undecodable frames: {type(exc).__name__}: {exc}") from None


def _decode(frames: list) -> Message:
    if len(frames) < 2:
        raise BadMessage(f"expected at least 2 frames, got {len(frames)}")
    op = bytes(frames[0])
    if len(op) != 1 or op[0] not in _REGISTRY:
        raise BadMessage(f"unknown opcode {op[:8]!r}")
    cls = _REGISTRY[op[0]]
    try:
        head = msgpack.unpackb(bytes(frames[1]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadMessage(f"{cls.__name__}: payload is not msgpack ({exc})") from None
    if not isinstance(head, dict) or set(head) != {"v", "f", "a"}:
        raise BadMessage(f"{cls.__name__}: malformed header")
    if head["v"] != PROTOCOL_VERSION:
        raise BadMessage(f"{cls.__name__}: protocol version {head['v']!r}, expected {PROTOCOL_VERSION}")
    values = head["f"]
    if not isinstance(values, dict):
        raise BadMessage(f"{cls.__name__}: fields are not a map")
    values = dict(values)
    values.update(_decode_arrays(cls, head["a"], frames[2:]))
    return cls(**_decode_fields(cls.__name__, cls, values))


def _check_fields(where: str, values: dict, expected: dict) -> None:
    if set(values) != set(expected):
        missing, extra = set(expected) - set(values), set(values) - set(expected)
        raise BadMessage(f"{where}: missing {sorted(missing)} unknown {sorted(map(str, extra))[:8]}")
    for name, value in values.items():
        if not _is_a(value, expected[name]):
            raise BadMessage(f"{where}.{name}: unexpected {type(value).__name__}")


def _decode_fields(where: str, cls, values: dict) -> dict:
    """The checked constructor arguments of a message or item: its fields, items decoded."""
    _check_fields(where, values, _FIELD_TYPES[cls])
    for name, hint in _ITEM_FIELDS[cls].items():
        values[name] = _from_wire(f"{where}.{name}", hint, values[name])
    return values


def _decode_item(where: str, cls, value):
    if not isinstance(value, dict):
        raise BadMessage(f"{where}: expected a map, got {type(value).__name__}")
    return cls(**_decode_fields(where, cls, dict(value)))


def _decode_arrays(cls, specs, frames) -> dict[str, np.ndarray]:
    if not isinstance(specs, list) or len(specs) != len(cls.ARRAYS) or len(frames) != len(specs):
        raise BadMessage(f"{cls.__name__}: expected arrays {cls.ARRAYS}")
    out = {}
    for spec, frame in zip(specs, frames):
        if not (isinstance(spec, list) and len(spec) == 3 and spec[0] in cls.ARRAYS
                and spec[1] in _ARRAY_DTYPES and isinstance(spec[2], list) and len(spec[2]) <= MAX_ARRAY_DIMS
                and all(type(d) is int and d >= 0 for d in spec[2])):
            raise BadMessage(f"{cls.__name__}: bad array spec {spec!r:.200}")
        buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        dtype = np.dtype(spec[1])
        count = math.prod(spec[2])   # exact: an int64 product could wrap around to match the frame
        if buf.nbytes != count * dtype.itemsize:
            raise BadMessage(f"{cls.__name__}.{spec[0]}: {buf.nbytes} bytes for shape {spec[2]}")
        out[spec[0]] = np.frombuffer(buf, dtype=dtype).reshape(spec[2])
    return out


def i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


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
    controls: penalties, logit bias and min_p of the rows that use them (LogitsControls)."""
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


ALL_MESSAGES: tuple[type, ...] = tuple(_REGISTRY.values())
