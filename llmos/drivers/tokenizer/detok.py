"""Incremental detokenization with stop strings, one state per request.

Text is produced from token ids with a small look-back window so that multi-token
characters and word-boundary spaces come out right, and a character tail that could
be the start of a stop string is held back until it is known not to be one.
"""
from __future__ import annotations

LOOKBACK = 6


class DetokState:
    def __init__(self, tokenizer, stop: list[str], prior: list[int]):
        self.tok = tokenizer
        self.stop = stop
        self.ids = list(prior)
        # A predecessor holds back the tokens of an unfinished character (their text is not
        # out yet, though the kernel counts them as answered): start reading before them.
        self.read = len(self.ids)
        self.text = self._decode(self.ids) if prior else ""   # all text produced so far
        while self.read and self.text.endswith("\ufffd") and len(self.ids) - self.read < LOOKBACK:
            self.read -= 1
            self.text = self._decode(self.ids[: self.read])
        self.prefix = max(0, self.read - LOOKBACK)
        self.emitted = len(self.text)                            # chars handed out so far
        self.matchers = [_StopMatcher(s) for s in stop]
        self._matched = 0                                        # chars of self.text fed to the matchers
        self._advance()

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def feed(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """Add tokens; return (text to emit now, whether a stop string was hit)."""
        self.ids.extend(ids)
        if len(self.ids) > self.read:
            before = self._decode(self.ids[self.prefix:self.read])
            after = self._decode(self.ids[self.prefix:])
            if len(after) > len(before) and (final or not after.endswith("\ufffd")):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                delta = self.text[self.emitted:cut]
                self.text = self.text[:cut]
                self.emitted = cut
                return delta, True
        hold = 0 if final or not self.stop else self._partial_stop_len()
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta, False

    def _find_stop(self) -> int | None:
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _advance(self) -> None:
        new = self.text[self._matched:]
        self._matched = len(self.text)
        for m in self.matchers:
            m.feed(new)

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string:
        each matcher knows it after reading only the new characters (linear overall)."""
        self._advance()
        return max((m.partial for m in self.matchers), default=0)


class _StopMatcher:
    """Knuth-Morris-Pratt over one stop string: `partial` is the length of the longest
    suffix of the text fed so far that is a proper prefix of the stop string."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0] * len(stop)   # fail[i]: longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, text: str) -> None:
        s, q, fail = self.stop, self.state, self.fail
        for c in text:
            while q and (q == len(s) or s[q] != c):
                q = fail[q - 1]
            if s[q] == c:
                q += 1
        self.state = q

    @property
    def partial(self) -> int:
        return self.state if self.state < len(self.stop) else self.fail[-1]
