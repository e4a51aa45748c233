"""What a model's step loop hands on after each step (ModelEngine -> FrontDoor, one way):
the requests that progressed, and the requests that ended with an error, as values."""
from __future__ import annotations

from dataclasses import dataclass, field

from llmos.kernel.requests import Request


@dataclass(frozen=True)
class Failure:
    """How a request ended in error: the HTTP status, OpenAI-style code and message its client gets."""
    status: int
    code: str
    message: str


@dataclass
class EngineOutputs:
    progressed: list[Request] = field(default_factory=list)   # new tokens, or a finish, to detokenize
    failed: list[tuple[Request, Failure]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.progressed or self.failed)
