"""Sampling parameters: one definition, validated by the io driver and again by the kernel
(the kernel never trusts the bus). Pure Python: the kernel imports it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import cached_property

from llmos import grammar_spec

# Hard limits, checked wherever a request enters (io driver, batch lines) and again in the
# kernel. OpenAI's where it has one; the model-dependent ones (context, vocabulary) are the
# kernel's (frontdoor.py). Every int also fits the int32/int64 field it travels in.
MAX_TOP_LOGPROBS = 20          # OpenAI's top_logprobs limit
MIN_TOP_P = 1e-30              # smaller positive top_p values are raised to this (float32 keeps it)
MAX_TOKENS_LIMIT = 2**31 - 1   # max_tokens / min_tokens travel as int32; the context bounds them further
MAX_TOP_K = 2**31 - 1          # int32 on the wire; the kernel bounds it by the vocabulary
MAX_STOP_STRINGS = 4           # OpenAI's limit
MAX_STOP_CHARS = 256           # per stop string: it is searched in every new piece of text
MAX_STOP_TOKEN_IDS = 256
MAX_TOKEN_ID = 2**31 - 1       # token ids travel as int32; the kernel bounds them by the vocabulary
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1   # int64, as OpenAI documents the seed
MAX_CHOICES = 128              # OpenAI's limit on n
MAX_CHOICE_TOKENS = 2**22      # n x max_tokens: the most one request may ask the model to generate
MAX_LOGPROB_ENTRIES = 256      # n x (top_logprobs + 1): logprob entries per generated position
MAX_PROMPT_CHARS = 4_000_000   # a prompt, or all message contents together (the body cap is 32 MiB)
MAX_PROMPT_TOKEN_IDS = 1 << 20  # a prompt given as token ids; the context bounds it further
MAX_MESSAGES = 2048            # OpenAI's limit on messages
MAX_TIMEOUT_S = 7 * 24 * 3600  # timeout / queue_timeout: a week
MAX_TENANT_CHARS = 64
MAX_REQUEST_ID_CHARS = 256     # the io driver allows 128 for X-Request-Id; job lines make longer ones
MAX_PENALTY = 2.0              # presence_penalty / frequency_penalty in [-2, 2] (OpenAI's)
MAX_REPETITION_PENALTY = 2.0   # repetition_penalty in (0, 2]: past 2 a repeated token is all but banned
MAX_LOGIT_BIAS_ENTRIES = 300   # OpenAI's limit on logit_bias
MAX_LOGIT_BIAS = 100.0         # each bias in [-100, 100] (OpenAI's); the kernel bounds ids by the vocabulary
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")   # a logit_bias key: a token id as a plain decimal string


def check_text(name: str, value: str) -> None:
    """Text that crosses the bus must be valid UTF-8: JSON can carry a lone surrogate
    ("\\ud800"), which no encoder can write."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParam(name, f"{name} is not valid Unicode text (a lone surrogate at character {exc.start})") \
            from None


class InvalidParam(ValueError):
    """A request parameter is out of range. `param` names the field (OpenAI's error.param)."""

    def __init__(self, param: str, message: str, code: str = "invalid_parameter"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class SamplingParams:
    max_tokens: int | None = None      # None: up to the model's context
    temperature: float = 1.0           # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1                    # -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None        # number of top logprobs per token; None: no logprobs
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0      # logit -= presence * (token generated so far)
    frequency_penalty: float = 0.0     # logit -= frequency * (times generated so far)
    repetition_penalty: float = 1.0    # CTRL's, over prompt and output; 1: off
    logit_bias: dict[str, float] = field(default_factory=dict)   # token id (decimal string, as JSON keys) -> bias
    min_p: float = 0.0                 # keep tokens with p >= min_p * p_max; 0: off
    structured: dict | None = None     # grammar_spec's {"kind", "spec"}: the output must match it; None: free

    @cached_property
    def stop_id_set(self) -> frozenset[int]:
        """stop_token_ids for the per-token check (validated: at most MAX_STOP_TOKEN_IDS)."""
        return frozenset(self.stop_token_ids)

    @cached_property
    def logits_controls(self) -> bool:
        """Whether the sampler must change this sequence's logits (penalties, bias, min_p): only
        these sequences carry LogitsControls in the step plan; all others take the plain path."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_p)

    @cached_property
    def bias_pairs(self) -> tuple[list[int], list[float]]:
        """logit_bias as (token ids, biases), in key order (validated: ids are decimal strings)."""
        return [int(k) for k in self.logit_bias], [float(v) for v in self.logit_bias.values()]

    @cached_property
    def grammar_key(self) -> str | None:
        """The constraint's cache key (grammar_spec.key); None: unconstrained."""
        return None if self.structured is None else grammar_spec.key(self.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "SamplingParams":
        if not isinstance(raw, dict):
            raise InvalidParam("params", "sampling parameters must be an object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidParam(name, f"unknown parameter '{name}'")
        p = cls(**{k: v for k, v in raw.items() if v is not None or k in ("max_tokens", "seed", "logprobs")})
        p._validate()
        return p

    def _validate(self) -> None:
        _int("max_tokens", self.max_tokens, lo=1, hi=MAX_TOKENS_LIMIT, optional=True)
        _num("temperature", self.temperature, 0.0, 2.0)
        _num("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidParam("top_p", "top_p must be greater than 0")
        # The plan carries float32: a positive top_p below its range would arrive as 0 and fail the
        # whole step in the driver. Any top_p this small keeps only the top token, as MIN_TOP_P does.
        self.top_p = max(self.top_p, MIN_TOP_P)
        _int("top_k", self.top_k, lo=-1, hi=MAX_TOP_K)
        if self.top_k == 0:
            self.top_k = -1  # OpenAI-style clients send 0 for "off"
        _int("seed", self.seed, lo=SEED_MIN, hi=SEED_MAX, optional=True)
        _int("logprobs", self.logprobs, lo=0, hi=MAX_TOP_LOGPROBS, optional=True)
        _int("min_tokens", self.min_tokens, lo=0, hi=MAX_TOKENS_LIMIT)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParam("ignore_eos", "ignore_eos must be a boolean")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParam("stop", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
                raise InvalidParam("stop", f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
            check_text("stop", s)
        ids = self.stop_token_ids
        if not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS:   # the count before any element
            raise InvalidParam("stop_token_ids", f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} ids")
        if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in ids):
            raise InvalidParam("stop_token_ids", f"stop_token_ids must be integers in [0, {MAX_TOKEN_ID}]")
        self.stop_token_ids = sorted(set(ids))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParam("min_tokens", "min_tokens must not exceed max_tokens")
        self._validate_controls()
        if self.structured is not None:
            self._validate_structured()

    def _validate_structured(self) -> None:
        try:
            self.structured = grammar_spec.normalize(self.structured)
        except grammar_spec.BadSpec as exc:
            raise InvalidParam("structured", str(exc)) from None
        # The grammar decides where the output ends (EOS only where it accepts): a rule that
        # overrides EOS would let it run on past the end it allows.
        for name in ("ignore_eos", "min_tokens"):
            if getattr(self, name):
                raise InvalidParam(name, f"{name} cannot be combined with a structured-output constraint")

    def _validate_controls(self) -> None:
        _num("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _num("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        _num("repetition_penalty", self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY)
        if self.repetition_penalty == 0:
            raise InvalidParam("repetition_penalty", "repetition_penalty must be greater than 0")
        _num("min_p", self.min_p, 0.0, 1.0)
        bias = self.logit_bias
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:   # the count before any entry
            raise InvalidParam("logit_bias", f"logit_bias must be an object of at most {MAX_LOGIT_BIAS_ENTRIES} "
                                             "token ids")
        normal = {}
        for key, value in bias.items():
            if not (isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key) and int(key) <= MAX_TOKEN_ID):
                raise InvalidParam("logit_bias", f"logit_bias keys must be token ids in [0, {MAX_TOKEN_ID}] written "
                                                 f"in decimal, got {key!r:.40}")
            if str(int(key)) in normal:
                raise InvalidParam("logit_bias", f"logit_bias names token {int(key)} twice")
            _num("logit_bias", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
            normal[str(int(key))] = float(value)
        self.logit_bias = normal
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            setattr(self, name, float(getattr(self, name)))   # the plan carries float32


def _int(name, value, lo=None, hi=None, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParam(name, f"{name} must be an integer, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise InvalidParam(name, f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidParam(name, f"{name} must be <= {hi}, got {value}")


def _num(name, value, lo, hi):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidParam(name, f"{name} must be a number, got {type(value).__name__}")
    if not lo <= value <= hi:   # NaN fails this too
        raise InvalidParam(name, f"{name} must be between {lo} and {hi}, got {value}")
