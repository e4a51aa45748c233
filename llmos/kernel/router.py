"""Which replica of a model serves a request: cache-aware, then least loaded.

The idea is SGLang's router's: a replica that served a prompt's prefix recently still holds
its KV in its prefix cache, so sending the request there skips that prefill. But affinity
must not pile everything onto one replica: it wins only while that replica's load is within
`balance_abs` tokens or `balance_rel` times the least loaded one's. Otherwise the request
goes to the replica with the least outstanding work, in tokens (prompt + tokens still to
generate, of every request it holds).

Routing happens at submit, before tokenization, so prefixes are of the prompt's text: each
replica remembers the hashes of the leading PREFIX_CHARS[i] characters of recent prompts
(an LRU per replica), and the longest remembered prefix wins.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

PREFIX_CHARS = (64, 256, 1024, 4096)
REMEMBERED = 4096            # prefix hashes kept per replica


def prompt_key(prompt: str | None, messages: list | None, token_ids: list | None) -> str:
    """A text to match prefixes on: the prompt, the chat messages in order, or the token ids."""
    if prompt is not None:
        return prompt
    if messages is not None:
        return "\x1e".join(f"{m.get('role')}\x1f{m.get('content')}" for m in messages if isinstance(m, dict))
    return ",".join(map(str, token_ids or []))


def _hashes(key: str) -> list[tuple[int, bytes]]:
    out = []
    for n in PREFIX_CHARS:
        if len(key) < n and out:
            break
        out.append((min(n, len(key)), hashlib.blake2b(key[:n].encode("utf-8", "surrogatepass"),
                                                      digest_size=8).digest()))
    return out


@dataclass
class Replica:
    name: str                  # its engine
    load_tokens: int = 0       # outstanding work (the caller keeps it current)
    seen: OrderedDict = None

    def __post_init__(self):
        self.seen = OrderedDict() if self.seen is None else self.seen

    def matched(self, hashes) -> int:
        return max((n for n, h in hashes if h in self.seen), default=0)

    def remember(self, hashes) -> None:
        for _, h in hashes:
            self.seen[h] = None
            self.seen.move_to_end(h)
        while len(self.seen) > REMEMBERED:
            self.seen.popitem(last=False)


class Router:
    def __init__(self, balance_abs: int = 8192, balance_rel: float = 1.5):
        # 8,192 tokens: a handful of long-prompt requests; at 2,048 two or three ~850-token
        # prompts tipped the balance and the prefix spilled onto every replica
        # (benchmarks/replicas.py's router replay: 7 of 8 prefix/replica pairs at 2,048, the ideal 4 at 8,192).
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        self.replicas: dict[str, Replica] = {}
        self.cache_hits = 0
        self.routed = 0

    def set_replicas(self, names: list[str]) -> None:
        """The replicas that may take new requests now (others keep their memory for later)."""
        for name in names:
            self.replicas.setdefault(name, Replica(name))
        self._routable = list(names)

    def forget(self, name: str) -> None:
        self.replicas.pop(name, None)

    def pick(self, key: str, loads: dict[str, int]) -> str:
        """The replica for a prompt with text `key`; `loads`: outstanding tokens per replica."""
        names = [n for n in getattr(self, "_routable", []) if n in self.replicas]
        if not names:
            raise LookupError("no replica can take requests")
        for n in names:
            self.replicas[n].load_tokens = loads.get(n, 0)
        hashes = _hashes(key)
        least = min(names, key=lambda n: (self.replicas[n].load_tokens, n))
        floor = self.replicas[least].load_tokens
        best, best_len = least, 0
        for n in names:
            r = self.replicas[n]
            length = r.matched(hashes)
            balanced = r.load_tokens <= floor + self.balance_abs or r.load_tokens <= floor * self.balance_rel
            better = length > best_len or (length == best_len and length and r.load_tokens <
                                            self.replicas[best].load_tokens)   # a tie: the less loaded
            if better and balanced:
                best, best_len = n, length
        self.routed += 1
        self.cache_hits += best_len > 0
        self.replicas[best].remember(hashes)
        return best
