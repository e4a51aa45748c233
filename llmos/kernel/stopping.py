"""When a request's generation ends on its own: a stop token (end of sequence, or one of
its stop_token_ids, once min_tokens are out), its max_tokens, or the model's context."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopRule:
    eos_ids: frozenset[int] = frozenset()
    max_model_len: int = 2**31 - 1

    def reason(self, req, token: int) -> str | None:
        """The finish reason after `token` was appended to req's output, or None."""
        p = req.params
        n = len(req.output.ids)
        if n >= p.min_tokens and (token in p.stop_id_set or (not p.ignore_eos and token in self.eos_ids)):
            req.output.hidden_tail = 1  # the stop token itself is not part of the text
            return "stop"
        if n >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None
