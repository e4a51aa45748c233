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

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
