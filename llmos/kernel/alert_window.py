"""What a rule's figure is now: a gauge's value, a counter's increase or rate over the rule's
window, a histogram's quantile, a counter's share (alert_rules.py says which).

Pure arithmetic over `Figure`s; `Window` keeps the samples of one rule's series that its
window needs, at most about WINDOW_SAMPLES of them (one per window / WINDOW_SAMPLES), so a
rule costs the same memory whatever its window. Kernel counters start at zero and do not
go back, except when a series goes away and comes back (a driver row removed and added
again): a series below its old value counts from zero, as Prometheus does after a reset.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from llmos.kernel.alert_rules import Rule

WINDOW_SAMPLES = 100


@dataclass
class Figure:
    """One figure's series: label values (in label_names' order) -> a value, or for a
    histogram its cumulative bucket counts (one per bound, then +Inf: the count)."""
    kind: str
    label_names: tuple
    series: dict = field(default_factory=dict)
    bounds: list | None = None


class Window:
    """The past samples of one rule's series (those its `where` selects)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.spacing = window_s / WINDOW_SAMPLES
        self.samples: deque = deque()   # (time, {labels: value}), oldest first

    def baseline(self, now: float) -> tuple[float, dict] | None:
        """The newest sample at or before the window's start, else the oldest (a history
        shorter than the window); None before the first."""
        start = now - self.window_s
        while len(self.samples) >= 2 and self.samples[1][0] <= start:
            self.samples.popleft()
        return self.samples[0] if self.samples else None

    def add(self, now: float, series: dict) -> None:
        if not self.samples or now - self.samples[-1][0] >= self.spacing:
            self.samples.append((now, series))


def matches(labels: dict, matchers: tuple) -> bool:
    return all(any(fnmatchcase(labels.get(name, ""), p) for p in patterns) for name, patterns in matchers)


def rule_values(rule: Rule, figure: Figure | None, window: Window | None, now: float) -> dict[tuple, float]:
    """(label, value) pairs of the rule's `by` labels -> the figure's value for that alert.
    A group without a value now (no traffic in the window for a quantile or a share) is absent."""
    if figure is None:
        return {}
    names = figure.label_names
    current = {labels: v for labels, v in figure.series.items() if matches(dict(zip(names, labels)), rule.where)}
    if rule.fn == "value":
        return _sum_by(rule, names, current)
    base = window.baseline(now)
    window.add(now, current)
    if base is None:
        return {}
    base_t, past = base
    grow = {labels: _increase(v, past.get(labels)) for labels, v in current.items()}
    if rule.fn == "increase":
        return _sum_by(rule, names, grow)
    if rule.fn == "rate":
        elapsed = now - base_t
        return {k: v / elapsed for k, v in _sum_by(rule, names, grow).items()} if elapsed > 0 else {}
    if rule.fn == "share":
        part = {labels: v for labels, v in grow.items() if matches(dict(zip(names, labels)), rule.part)}
        totals, parts = _sum_by(rule, names, grow), _sum_by(rule, names, part)
        return {k: parts.get(k, 0.0) / t for k, t in totals.items() if t > 0}
    out = {}
    for k, buckets in _sum_by(rule, names, grow).items():   # quantile
        q = histogram_quantile(rule.quantile, figure.bounds, buckets)
        if q is not None:
            out[k] = q
    return out


def _increase(now, before):
    if isinstance(now, list):
        if before is None or len(before) != len(now) or now[-1] < before[-1]:
            return list(now)
        return [a - b for a, b in zip(now, before)]
    return now if before is None or now < before else now - before


def _sum_by(rule: Rule, names: tuple, series: dict) -> dict[tuple, float]:
    out: dict[tuple, object] = {}
    for labels, v in series.items():
        values = dict(zip(names, labels))
        key = tuple((b, values.get(b, "")) for b in rule.by)
        held = out.get(key)
        if held is None:
            out[key] = list(v) if isinstance(v, list) else float(v)
        elif isinstance(v, list):
            out[key] = [a + b for a, b in zip(held, v)]
        else:
            out[key] = held + float(v)
    return out


def histogram_quantile(q: float, bounds: list, cumulative: list) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank; the
    highest finite bound when it falls in +Inf; None without observations."""
    total = cumulative[-1] if cumulative else 0
    if not bounds or total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative):
        if count >= rank:
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return float(bounds[-1])
