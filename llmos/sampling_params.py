"""Sampling parameters: one definition, validated by the io driver and again by the kernel
(the kernel never trusts the bus). Pure Python: the kernel imports it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MAX_TOP_LOGPROBS = 20


class InvalidParam(ValueError):
    """A request parameter is out of range. `param` names the field (OpenAI's error.param)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


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
        _int("max_tokens", self.max_tokens, lo=1, optional=True)
        _num("temperature", self.temperature, 0.0, 2.0)
        _num("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidParam("top_p", "top_p must be greater than 0")
        _int("top_k", self.top_k, lo=-1)
        if self.top_k == 0:
            self.top_k = -1  # OpenAI-style clients send 0 for "off"
        _int("seed", self.seed, lo=-(2**63), hi=2**63 - 1, optional=True)
        _int("logprobs", self.logprobs, lo=0, hi=MAX_TOP_LOGPROBS, optional=True)
        _int("min_tokens", self.min_tokens, lo=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParam("ignore_eos", "ignore_eos must be a boolean")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParam("stop", "stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            raise InvalidParam("stop", "at most 16 stop strings")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidParam("stop_token_ids", "stop_token_ids must be a list of non-negative integers")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParam("min_tokens", "min_tokens must not exceed max_tokens")


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
    if not lo <= value <= hi:
        raise InvalidParam(name, f"{name} must be between {lo} and {hi}, got {value}")
