"""Step accounting: how much of each step is the model and how much is the kernel."""
from __future__ import annotations

from collections import deque


class StepStats:
    def __init__(self, window: int = 200):
        self.steps = 0
        self.tokens = 0
        self.wall_s = 0.0
        self.forward_s = 0.0
        self.recent: deque = deque(maxlen=window)   # (end time, tokens)
        self.gaps = 0          # steps sent straight after the previous result
        self.gap_s = 0.0       # ... and the time from that result to the plan's send, summed
        self.ahead = 0         # steps sent ahead, while the one before ran (kernel/run_ahead.py)

    def record(self, wall_s: float, forward_s: float, tokens: int, now: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.wall_s += wall_s
        self.forward_s += min(forward_s, wall_s)
        self.recent.append((now, tokens))

    def record_gap(self, gap_s: float) -> None:
        self.gaps += 1
        self.gap_s += gap_s

    @property
    def kernel_share(self) -> float:
        """Fraction of step wall time spent outside the model forward (scheduling, IPC, bookkeeping)."""
        return 0.0 if self.wall_s == 0 else 1.0 - self.forward_s / self.wall_s

    def to_dict(self) -> dict:
        return {"steps": self.steps, "tokens_computed": self.tokens, "step_wall_s": round(self.wall_s, 4),
                "forward_s": round(self.forward_s, 4), "kernel_share": round(self.kernel_share, 4),
                "gaps": self.gaps, "gap_s": round(self.gap_s, 4), "ahead": self.ahead}
