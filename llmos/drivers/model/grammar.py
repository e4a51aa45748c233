"""Structured outputs in the model driver: llguidance matchers and the token masks they give.

Where the state lives (the microkernel's promises):
- The kernel's tokens are the truth. Each constrained row of a plan (protocol.GrammarRow)
  carries its constraint and every token generated so far; the matchers here are a cache
  keyed by sequence id, advanced by the tokens that are new since the last step, and rebuilt
  from all of them when missing (a restarted driver), evicted, or holding another history.
  The driver never feeds a matcher the token it samples itself: a lost step leaves no trace.
- Compiling never runs on the kernel's loop nor inside a step: it runs on this module's one
  worker thread (llguidance drops the GIL while it builds), started when a plan first names a
  grammar, overlapping the forward pass. A row whose grammar is not ready when the logits
  are is *held* (StepResult.held): its token is void and the kernel plans its last position
  again, so it costs one recomputed token a step and never delays the batch. (Waiting in the
  kernel for a "ready" message instead would need a handshake per replica and per restart;
  holding needs none, and llguidance compiles in ~1 ms, so a hold is rare: mostly the
  tokenizer's one-time setup, ~0.5 s, on the first constrained request after a start.)
- Compiled grammars are cached by grammar_spec.key (at most MAX_TEMPLATES, least recently
  used first out); a sequence's matcher is a deep copy of its grammar's. Everything is bounded:
  the spec's size (grammar_spec), llguidance's fuel per build and per mask (its default
  LLParserLimits: ~20 ms and ~15 ms at most), COMPILE_TIMEOUT_S per build, MAX_MATCHERS.
- A grammar that fails to build, or a token the grammar refuses, fails that request alone
  (StepResult.grammar_errors -> 400), never the step.

EOS: allowed exactly where the matcher accepts (every EOS id of the model), so a constrained
sequence ends when its output is complete, and only then.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmos import grammar_spec, protocol

MAX_TEMPLATES = 64          # compiled grammars kept (each a few KB to a few MB of lexer states)
MAX_MATCHERS = 4096         # per-sequence matchers kept; an evicted one is rebuilt from its tokens
COMPILE_TIMEOUT_S = 10.0    # a build still running after this fails its requests (the fuel bounds it anyway)
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarFailed(ValueError):
    """The constraint cannot be built or followed; str() says why (it reaches the client)."""


@dataclass
class Masks:
    """What one step's constrained rows need from the sampler and tell the kernel."""
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # among the sampled rows
    allowed: torch.Tensor | None = None      # [len(positions), vocab] bool
    held: list[int] = field(default_factory=list)     # seq ids waiting for their grammar
    errors: list[list] = field(default_factory=list)  # [seq_id, message]


@dataclass
class _Entry:
    key: str
    matcher: object
    consumed: list[int]


class GrammarBook:
    """Owned by the model driver's runner (one thread calls it; the worker only compiles)."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_ids: list[int]):
        self.model_dir, self.vocab = Path(model_dir), vocab_size
        self.eos = torch.tensor(sorted({i for i in eos_ids if 0 <= i < vocab_size}), dtype=torch.long)
        self._worker: ThreadPoolExecutor | None = None
        self._tokenizer: Future | None = None
        self._templates: OrderedDict[str, tuple[Future, float]] = OrderedDict()
        self._matchers: OrderedDict[int, _Entry] = OrderedDict()
        self.holds = self.rebuilds = 0   # counters for tests and the benchmark

    def start(self, rows: list[protocol.GrammarRow]) -> None:
        """Before the forward pass: start building the grammars not built yet (no waiting)."""
        for g in rows:
            if g.key in self._templates:
                self._templates.move_to_end(g.key)
                continue
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="llmos-grammar")
                self._tokenizer = self._worker.submit(self._build_tokenizer)
            self._templates[g.key] = (self._worker.submit(self._compile, g.kind, g.spec, g.key), time.monotonic())
            while len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)

    def masks(self, rows: list[protocol.GrammarRow], seq_ids: np.ndarray, sampled: np.ndarray) -> Masks:
        """After the forward pass: each ready row's matcher brought up to its tokens and its
        mask of allowed next tokens; the rest held or failed. `sampled`: the plan rows that
        sample, in order (GrammarRow.row is one of them; runner.gather checked the controls
        the same way)."""
        out = Masks()
        if not rows:
            return out
        position = {int(r): i for i, r in enumerate(sampled)}
        ready: list[tuple[int, object]] = []
        for g in rows:
            at = position.pop(g.row, None)   # popped: a row named twice is refused
            if at is None:
                raise ValueError(f"grammar for row {g.row}, which does not sample or has one twice")
            seq = int(seq_ids[g.row])
            try:
                matcher = self._matcher(seq, g)
            except GrammarFailed as exc:
                self._matchers.pop(seq, None)
                out.errors.append([seq, str(exc)])
                continue
            if matcher is None:
                out.held.append(seq)
                self.holds += 1
            else:
                ready.append((at, matcher))
        if ready:
            out.positions = np.asarray([at for at, _ in ready], dtype=np.int64)
            out.allowed = self._allowed([m for _, m in ready])
        return out

    def _matcher(self, seq: int, g: protocol.GrammarRow):
        """The sequence's matcher after all of g.output_ids; None while its grammar compiles."""
        fut, since = self._templates.get(g.key, (None, 0.0))
        if fut is None:
            raise GrammarFailed("the grammar was evicted before it was built; retry the request")
        if not fut.done():
            if time.monotonic() - since > COMPILE_TIMEOUT_S:
                raise GrammarFailed(f"the grammar took longer than {COMPILE_TIMEOUT_S:.0f} s to build")
            return None
        if fut.exception() is not None:
            raise GrammarFailed(str(fut.exception()))
        ids = g.output_ids
        e = self._matchers.get(seq)
        if e is None or e.key != g.key or len(e.consumed) > len(ids) or ids[: len(e.consumed)] != e.consumed:
            e = self._matchers[seq] = _Entry(g.key, fut.result().deep_copy(), [])
            self.rebuilds += 1
        self._matchers.move_to_end(seq)
        while len(self._matchers) > MAX_MATCHERS:
            self._matchers.popitem(last=False)
        new = ids[len(e.consumed):]
        if new:
            if not all(type(t) is int and 0 <= t < self.vocab for t in new):
                raise GrammarFailed("output token ids out of the vocabulary")
            if not e.matcher.consume_tokens(new):
                raise GrammarFailed(f"the output left the grammar: {e.matcher.get_error()[:300]}")
            e.consumed.extend(new)
        if e.matcher.is_error():
            raise GrammarFailed(e.matcher.get_error()[:300])
        return e.matcher

    def _allowed(self, matchers: list) -> torch.Tensor:
        from llguidance.torch import fill_next_token_bitmask
        words = -(-self.vocab // 32)
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
        for j, m in enumerate(matchers):
            fill_next_token_bitmask(m, bitmask, j)
        allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().view(len(matchers), -1)[:, : self.vocab]
        if len(self.eos):   # EOS exactly where the output may end, whichever EOS the model uses
            accepting = torch.tensor([m.is_accepting() for m in matchers])
            allowed[:, self.eos] = accepting[:, None]
        return allowed

    # ------------------------------------------------------------ on the worker thread
    def _build_tokenizer(self):
        import llguidance.hf
        from transformers import AutoTokenizer
        return llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(self.model_dir), n_vocab=self.vocab)

    def _compile(self, kind: str, spec: str, key: str):
        import llguidance
        try:   # the kernel is not trusted blindly: the spec is checked as the API checked it
            c = grammar_spec.normalize({"kind": kind, "spec": spec})
        except grammar_spec.BadSpec as exc:
            raise GrammarFailed(str(exc)) from None
        if grammar_spec.key(c) != key:
            raise GrammarFailed("the grammar's key does not match its spec")
        try:
            m = llguidance.LLMatcher(self._tokenizer.result(), grammar_spec.to_lark(c), log_level=0)
        except Exception as exc:   # GBNF the converter cannot read
            raise GrammarFailed(f"{type(exc).__name__}: {exc}"[:300]) from None
        if m.is_error():
            raise GrammarFailed(m.get_error()[:300])
        return m
