"""Alerts: the kernel's rules (alert_rules.py), evaluated once a second over its figures.

Each alert (one rule, one set of its `by` labels) has explicit states:

    inactive -> pending   the condition holds
    pending  -> inactive  it stopped holding before `for` was up (nothing is said)
    pending  -> firing    it held for `for`: said once (the log, on_change: delivery)
    firing   -> resolved  it stopped holding: said once; the alert moves to `recent`

A rule whose evaluation raises fails alone (logged once per streak, shown in the report) and
its alerts keep their state; the loop goes on. The kernel owns all of it: `report()` answers
the "alerts" query; `set_rules` replaces the rules (a config reload).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from typing import Callable

from llmos import protocol
from llmos.kernel.alert_rules import PLACEHOLDER, Rule, parse_rules
from llmos.kernel.alert_window import Figure, Window, rule_values

log = logging.getLogger(__name__)
EVAL_INTERVAL_S = 1.0
RECENT = 50   # resolved alerts kept for `llmos alerts`


class AlertState(enum.Enum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


_ALLOWED = {
    AlertState.INACTIVE: {AlertState.PENDING},
    AlertState.PENDING: {AlertState.INACTIVE, AlertState.FIRING},
    AlertState.FIRING: {AlertState.RESOLVED},
    AlertState.RESOLVED: set(),
}


class Alert:
    """One alert of one rule: its state, and when each change happened (wall time)."""

    def __init__(self, rule: Rule, labels: tuple, now: float, wall: float):
        self.rule, self.labels = rule, labels
        self.state = AlertState.INACTIVE
        self.value: float | None = None
        self.pending_since = now
        self.active_since, self.fired_at, self.resolved_at = wall, None, None

    def change_state(self, new: AlertState, wall: float) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"alert {self.key}: illegal transition {self.state.name} -> {new.name}")
        self.state = new
        if new is AlertState.FIRING:
            self.fired_at = wall
        elif new is AlertState.RESOLVED:
            self.resolved_at = wall

    @property
    def key(self) -> str:
        return self.rule.name + ("{" + ",".join(f"{k}={v}" for k, v in self.labels) + "}" if self.labels else "")

    def summary(self) -> str:
        labels = dict(self.labels)

        def fill(m):
            name = m.group(1)
            if name == "value":
                return "-" if self.value is None else f"{self.value:.4g}"
            return f"{self.rule.threshold:g}" if name == "threshold" else labels.get(name, "")
        return PLACEHOLDER.sub(fill, self.rule.summary)

    def record(self) -> protocol.Alert:
        return protocol.Alert(rule=self.rule.name, state=self.state.value, severity=self.rule.severity,
                              labels=dict(self.labels), value=self.value, threshold=self.rule.threshold,
                              condition=self.rule.describe(), summary=self.summary(),
                              active_since=self.active_since, fired_at=self.fired_at, resolved_at=self.resolved_at)


class Alerts:
    def __init__(self, rules: list[Rule], on_change: Callable[[protocol.Alert], None] = lambda a: None,
                 clock=time.monotonic, wall=time.time):
        """`on_change(record)`: an alert fired or resolved (the kernel hands it to delivery;
        it must not block)."""
        self.on_change, self.clock, self.wall = on_change, clock, wall
        self.rules: list[Rule] = []
        self.windows: dict[Rule, Window] = {}
        self.active: dict[tuple, Alert] = {}     # (rule name, labels) -> a pending or firing alert
        self.recent: deque = deque(maxlen=RECENT)
        self.failing: dict[str, str] = {}        # rule name -> why its last evaluation failed
        self._figures_failing = False
        self.set_rules(rules)

    def set_rules(self, rules: list | None) -> None:
        """Replace the rules: parsed Rules, taken as they are; or the config's tables (a list
        of dicts; None or [] for none), merged over the defaults by parse_rules (a bad one
        raises ValueError and nothing changes). A rule kept as it was keeps its window; the
        firing alerts of a rule that is gone resolve, its pending ones are dropped."""
        if not rules or not all(isinstance(r, Rule) for r in rules):
            rules = parse_rules(rules)
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"alert rules: a name is given twice ({', '.join(sorted(names))})")
        self.windows = {r: self.windows.get(r) or Window(r.window_s) for r in rules if r.window_s}
        self.rules = list(rules)
        by_name = {r.name: r for r in rules}
        wall = self.wall()
        for key, alert in list(self.active.items()):
            if key[0] not in by_name:
                if alert.state is AlertState.FIRING:
                    self._resolve(key, alert, wall)
                else:
                    del self.active[key]
            else:
                alert.rule = by_name[key[0]]
        self.failing = {n: why for n, why in self.failing.items() if n in by_name}

    # ------------------------------------------------------------ evaluation
    async def run(self, read_figures: Callable[[], dict[str, Figure]], interval: float = EVAL_INTERVAL_S) -> None:
        """The kernel's alerts loop: evaluate, wait, again."""
        while True:
            try:
                figures = read_figures()
            except Exception:
                if not self._figures_failing:
                    log.exception("alerts: the kernel's figures could not be read; the rules wait")
                self._figures_failing = True
            else:
                self._figures_failing = False
                self.evaluate(figures)
            await asyncio.sleep(interval)

    def evaluate(self, figures: dict[str, Figure]) -> list[protocol.Alert]:
        """One round over every rule; returns the alerts that fired or resolved in it."""
        now, wall = self.clock(), self.wall()
        changed = []
        for rule in self.rules:
            try:
                values = rule_values(rule, figures.get(rule.metric), self.windows.get(rule), now)
            except Exception as exc:
                if rule.name not in self.failing:
                    log.exception("alert rule %s could not be evaluated; its alerts keep their state", rule.name)
                self.failing[rule.name] = f"{type(exc).__name__}: {exc}"
                continue
            if self.failing.pop(rule.name, None) is not None:
                log.info("alert rule %s evaluates again", rule.name)
            changed += self._apply(rule, values, now, wall)
        return changed

    def _apply(self, rule: Rule, values: dict[tuple, float], now: float, wall: float) -> list[protocol.Alert]:
        changed = []
        holding = {labels: v for labels, v in values.items() if rule.holds(v)}
        for labels, value in holding.items():
            key = (rule.name, labels)
            alert = self.active.get(key)
            if alert is None:
                alert = self.active[key] = Alert(rule, labels, now, wall)
                alert.change_state(AlertState.PENDING, wall)
            alert.value = value
            if alert.state is AlertState.PENDING and now - alert.pending_since >= rule.for_s:
                alert.change_state(AlertState.FIRING, wall)
                log.warning("alert %s firing (%s): %s [%s, value %.4g]", alert.key, rule.severity, alert.summary(),
                            rule.describe(), value)
                changed.append(self._said(alert))
        for key, alert in list(self.active.items()):
            if key[0] != rule.name or key[1] in holding:
                continue
            if alert.state is AlertState.FIRING:
                alert.value = values.get(key[1])   # what it is now (None: no value)
                changed.append(self._resolve(key, alert, wall))
            else:   # pending that stopped holding: it never fired, so nothing is said
                alert.change_state(AlertState.INACTIVE, wall)
                del self.active[key]
        return changed

    def _resolve(self, key: tuple, alert: Alert, wall: float) -> protocol.Alert:
        alert.change_state(AlertState.RESOLVED, wall)
        del self.active[key]
        log.info("alert %s resolved after %.0f s: %s", alert.key, wall - alert.fired_at, alert.summary())
        record = self._said(alert)
        self.recent.append(record)
        return record

    def _said(self, alert: Alert) -> protocol.Alert:
        record = alert.record()
        try:
            self.on_change(record)
        except Exception:   # delivery is best effort; the alert's state is already right
            log.exception("alert %s: could not be handed to delivery", alert.key)
        return record

    # ------------------------------------------------------------ the query
    def report(self) -> protocol.AlertReport:
        order = {"firing": 0, "pending": 1}
        active = sorted((a.record() for a in self.active.values()), key=lambda r: (order[r.state], r.active_since))
        return protocol.AlertReport(active=active, recent=list(reversed(self.recent)),
                                    rules={r.name: r.describe() for r in self.rules}, failing=dict(self.failing))
