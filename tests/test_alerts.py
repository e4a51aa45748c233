"""Alert rules and their state machine (kernel/alert_rules.py, alert_window.py, alerts.py):
pure logic on figures made by hand, with an injected clock; nothing sleeps."""
from __future__ import annotations

import pytest

from llmos.kernel.alert_rules import DEFAULT_RULES, parse_rules, rules_or_defaults
from llmos.kernel.alert_window import Figure, histogram_quantile
from llmos.kernel.alerts import Alerts


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(rules: list[dict], defaults: bool = False):
    clock, said = Clock(), []
    alerts = Alerts(parse_rules(rules, defaults=defaults), said.append, clock=clock, wall=clock)
    return alerts, clock, said


def gauge(value: float, name="llmos_kv_cache_usage_ratio", labels=("m", "m-0")) -> dict:
    return {name: Figure("gauge", ("model", "engine"), {labels: value})}


def restarts(**per_driver) -> dict:
    return {"llmos_driver_restarts_total": Figure("counter", ("driver", "role"),
                                                  {(d, "tokenizer"): float(n) for d, n in per_driver.items()})}


KV = {"name": "Kv", "metric": "llmos_kv_cache_usage_ratio", "op": ">", "threshold": 0.95, "for": "1m",
      "summary": "{engine} at {value}"}
RESTARTS = {"name": "Restarts", "metric": "llmos_driver_restarts_total", "fn": "increase", "window": "10m",
            "op": ">", "threshold": 3, "summary": "{driver} restarted {value} times"}


# ---------------------------------------------------------------- the rule form

def test_the_defaults_parse_and_read_as_one_line_each():
    rules = {r.name: r for r in parse_rules(None)}
    assert list(rules) == [d["name"] for d in DEFAULT_RULES]
    assert rules["DriverRestarting"].describe() == "increase(llmos_driver_restarts_total[10m]) > 3"
    assert rules["KVCacheFull"].describe() == "llmos_kv_cache_usage_ratio > 0.95 for 1m"
    assert rules["ErrorRateHigh"].describe() == "share(llmos_requests_total[5m], status=5*) by (model) > 0.05 for 2m"


def test_a_rule_with_a_default_s_name_changes_only_its_keys_and_enabled_false_turns_it_off():
    rules = {r.name: r for r in parse_rules([{"name": "KVCacheFull", "threshold": 0.9},
                                             {"name": "ModelFailed", "enabled": False}, RESTARTS])}
    assert rules["KVCacheFull"].threshold == 0.9 and rules["KVCacheFull"].for_s == 60
    assert "ModelFailed" not in rules and "Restarts" in rules
    assert [r.name for r in parse_rules([], defaults=False)] == []


@pytest.mark.parametrize("change, key, problem", [
    ({"colour": "red"}, "colour", "unknown key"),
    ({"metric": "llmos_nope"}, "metric", "not a figure"),
    ({"fn": "increase"}, "fn", "needs a counter"),
    ({"fn": "avg"}, "fn", "not one of"),
    ({"op": "=>"}, "op", "not one of"),
    ({"threshold": float("nan")}, "threshold", "finite"),
    ({"threshold": True}, "threshold", "finite"),
    ({"threshold": 1e16}, "threshold", "within"),
    ({"for": "-1s"}, "for", "not a duration"),
    ({"for": "2d"}, "for", "from 0 to"),
    ({"for": "soon"}, "for", "not a duration"),
    ({"window": "5m"}, "window", "reads the figure now"),
    ({"where": {"tenant": "a"}}, "where", "not a label"),
    ({"where": {"model": []}}, "where", "give a pattern"),
    ({"by": ["tenant"]}, "by", "labels"),
    ({"by": "model"}, "by", "labels"),
    ({"severity": "page"}, "severity", "not one of"),
    ({"summary": "{tenant} is full"}, "summary", "{tenant}"),
    ({"summary": "x" * 301}, "summary", "at most"),
    ({"quantile": 0.5}, "quantile", "only then"),
    ({"enabled": "no"}, "enabled", "true or false"),
])
def test_a_bad_rule_is_an_error_naming_the_rule_and_the_key(change, key, problem):
    with pytest.raises(ValueError) as err:
        parse_rules([{**KV, **change}], defaults=False)
    assert str(err.value).startswith(f"alert rule 'Kv': {key}: ") and problem in str(err.value)


@pytest.mark.parametrize("rule, key, problem", [
    ({**RESTARTS, "window": None}, "window", "not a duration"),
    ({**{k: v for k, v in RESTARTS.items() if k != "window"}}, "window", "needs a window"),
    ({**RESTARTS, "window": "500ms"}, "window", "from 1 to"),
    ({"name": "Q", "metric": "llmos_request_queue_time_seconds", "fn": "quantile", "window": "5m", "op": ">",
      "threshold": 1}, "quantile", "only then"),
    ({"name": "Q", "metric": "llmos_request_queue_time_seconds", "fn": "quantile", "quantile": 1.5, "window": "5m",
      "op": ">", "threshold": 1}, "quantile", "between 0 and 1"),
    ({"name": "E", "metric": "llmos_requests_total", "fn": "share", "window": "5m", "op": ">", "threshold": 0.1},
     "part", "share needs part"),
    ({"name": "E", "metric": "llmos_requests_total", "fn": "share", "part": {"status": "5*"}, "window": "5m",
      "op": ">", "threshold": 5}, "threshold", "from 0 to 1"),
])
def test_windowed_rules_are_checked_too(rule, key, problem):
    with pytest.raises(ValueError) as err:
        parse_rules([rule], defaults=False)
    assert f"'{rule['name']}': {key}: " in str(err.value) and problem in str(err.value)


def test_a_rule_without_a_good_name_is_named_by_its_place_and_the_kernel_falls_back_to_the_defaults():
    with pytest.raises(ValueError, match=r"alert rule #2: name: '9lives'"):
        parse_rules([KV, {**KV, "name": "9lives"}])
    with pytest.raises(ValueError, match="alert rule #1: give a table"):
        parse_rules(["KVCacheFull"])
    assert [r.name for r in rules_or_defaults([{**KV, "op": "~"}])] == [d["name"] for d in DEFAULT_RULES]


# ---------------------------------------------------------------- the state machine

def test_for_is_respected_then_it_fires_once_and_resolves_once():
    alerts, clock, said = make([KV])
    assert alerts.evaluate(gauge(0.97)) == [] and alerts.report().active[0].state == "pending"
    clock.t += 59
    assert alerts.evaluate(gauge(0.99)) == []
    clock.t += 1
    (fired,) = alerts.evaluate(gauge(0.99))
    assert (fired.rule, fired.state, fired.labels, fired.summary) == ("Kv", "firing", {"model": "m", "engine": "m-0"},
                                                                      "m-0 at 0.99")
    for _ in range(5):
        clock.t += 1
        assert alerts.evaluate(gauge(0.98)) == []
    clock.t += 1
    (resolved,) = alerts.evaluate(gauge(0.5))
    assert resolved.state == "resolved" and resolved.value == 0.5 and resolved.resolved_at - resolved.fired_at == 6
    clock.t += 1
    assert alerts.evaluate(gauge(0.5)) == [] and alerts.evaluate({}) == []
    assert [a.state for a in said] == ["firing", "resolved"]
    report = alerts.report()
    assert report.active == [] and [a.state for a in report.recent] == ["resolved"]


def test_a_pending_alert_that_stops_holding_says_nothing():
    alerts, clock, said = make([KV])
    alerts.evaluate(gauge(0.97))
    clock.t += 30
    assert alerts.evaluate(gauge(0.2)) == []
    clock.t += 60
    assert alerts.evaluate(gauge(0.2)) == [] and said == [] and alerts.report().recent == []


def test_a_figure_that_goes_away_resolves_its_alert():
    alerts, clock, said = make([{**KV, "for": 0}])
    assert [a.state for a in alerts.evaluate(gauge(0.99))] == ["firing"]
    clock.t += 1
    (resolved,) = alerts.evaluate({})
    assert resolved.state == "resolved" and resolved.value is None


def test_increase_over_a_window_per_driver():
    alerts, clock, said = make([RESTARTS])
    alerts.evaluate(restarts(a=0, b=0))
    for n in range(1, 5):
        clock.t += 10
        alerts.evaluate(restarts(a=n, b=1))
    assert [(a.labels["driver"], a.state, a.summary) for a in said] == [("a", "firing", "a restarted 4 times")]
    clock.t = 1605   # the window starts after the first sample (0), before the second (1): still 4
    assert alerts.evaluate(restarts(a=4, b=1)) == []
    clock.t = 1610   # it starts at the second: 4 - 1
    (resolved,) = alerts.evaluate(restarts(a=4, b=1))
    assert resolved.state == "resolved" and resolved.labels["driver"] == "a" and resolved.value == 3


def test_a_counter_that_starts_again_counts_from_zero():
    alerts, clock, said = make([{**RESTARTS, "threshold": 1}])
    alerts.evaluate(restarts(a=5))
    clock.t += 10
    assert alerts.evaluate(restarts(a=1)) == []      # went away and came back: +1
    clock.t += 10
    assert [a.value for a in alerts.evaluate(restarts(a=3))] == [3]


def test_rate_share_and_quantile():
    rate = {"name": "R", "metric": "llmos_driver_restarts_total", "fn": "rate", "window": "1m", "by": [],
            "op": ">", "threshold": 0.1}
    share = {"name": "E", "metric": "llmos_requests_total", "fn": "share", "part": {"status": "5*"}, "window": "5m",
             "by": ["model"], "op": ">", "threshold": 0.25, "summary": "{model} {value}"}
    quant = {"name": "Q", "metric": "llmos_request_queue_time_seconds", "fn": "quantile", "quantile": 0.5,
             "window": "5m", "op": ">", "threshold": 1.5}
    alerts, clock, said = make([rate, share, quant])
    names = ("model", "tenant", "priority_class", "status", "finish_reason")

    def figures(r, ok, failed, buckets):
        return {**restarts(a=r),
                "llmos_requests_total": Figure("counter", names, {("m", "t", "batch", "200", "stop"): ok,
                                                                  ("m", "t", "batch", "503", "error"): failed}),
                "llmos_request_queue_time_seconds": Figure("histogram", ("model", "priority_class"),
                                                           {("m", "batch"): buckets}, [1.0, 2.0])}
    alerts.evaluate(figures(0, 10, 0, [5, 5, 5]))
    clock.t += 60
    out = {a.rule: a for a in alerts.evaluate(figures(12, 16, 2, [5, 6, 9]))}
    assert out["R"].value == pytest.approx(0.2)
    assert "E" not in out                             # 2 of 8: a quarter is not above a quarter
    assert out["Q"].value == pytest.approx(2.0)       # 1 in (1, 2], 3 above 2: the median is at 2
    clock.t += 60
    out = {a.rule: a for a in alerts.evaluate(figures(12, 16, 5, [5, 6, 9]))}
    assert out["E"].value == pytest.approx(5 / 11) and out["E"].summary == "m 0.4545"


def test_histogram_quantile_is_prometheus_s():
    assert histogram_quantile(0.5, [1.0, 2.0, 4.0], [2, 4, 4, 4]) == pytest.approx(1.0)
    assert histogram_quantile(0.75, [1.0, 2.0, 4.0], [2, 4, 4, 4]) == pytest.approx(1.5)
    assert histogram_quantile(0.99, [1.0, 2.0], [0, 0, 3]) == 2.0     # in +Inf: the highest bound
    assert histogram_quantile(0.5, [1.0], [0, 0]) is None


def test_a_rule_that_raises_fails_alone_and_its_alerts_keep_their_state():
    alerts, clock, said = make([{**KV, "for": 0}, RESTARTS])
    alerts.evaluate({**gauge(0.99), **restarts(a=0)})
    clock.t += 1
    broken = {"llmos_kv_cache_usage_ratio": Figure("gauge", ("model", "engine"), {("m", "m-0"): "full"}),
              **restarts(a=9)}
    out = alerts.evaluate(broken)
    assert [(a.rule, a.state) for a in out] == [("Restarts", "firing")]
    report = alerts.report()
    assert "Kv" in report.failing and {a.rule for a in report.active} == {"Kv", "Restarts"}
    clock.t += 1
    assert [(a.rule, a.state) for a in alerts.evaluate({**gauge(0.1), **restarts(a=9)})] == [("Kv", "resolved")]
    assert alerts.report().failing == {}


def test_delivery_that_raises_changes_nothing():
    clock = Clock()

    def broken(alert):
        raise OSError("no")
    alerts = Alerts(parse_rules([{**KV, "for": 0}], defaults=False), broken, clock=clock, wall=clock)
    assert [a.state for a in alerts.evaluate(gauge(0.99))] == ["firing"]


def test_new_rules_replace_old_ones_and_a_bad_set_changes_nothing():
    alerts, clock, said = make([{**KV, "for": 0}])
    alerts.evaluate(gauge(0.99))
    with pytest.raises(ValueError, match="'Kv': op"):
        alerts.set_rules([{**KV, "op": "~"}])
    assert [r.name for r in alerts.rules] == ["Kv"]
    alerts.set_rules([{**KV, "threshold": 0.995}, {"name": "ModelFailed", "enabled": False}])
    rules = {r.name: r for r in alerts.rules}   # dicts are merged over the defaults, as the config's are
    assert rules["Kv"].threshold == 0.995 and "ModelFailed" not in rules and "KVCacheFull" in rules
    assert len(said) == 1
    clock.t += 1
    assert [a.state for a in alerts.evaluate(gauge(0.99))] == ["resolved"]
    alerts.set_rules(parse_rules([{**KV, "for": 0}], defaults=False))
    clock.t += 1
    alerts.evaluate(gauge(0.99))
    alerts.set_rules(parse_rules([RESTARTS], defaults=False))   # Kv is gone: its firing alert resolves
    assert [a.state for a in said] == ["firing", "resolved", "firing", "resolved"] and alerts.report().active == []
    alerts.set_rules(None)   # the config names no rules (a reload): the defaults
    assert [r.name for r in alerts.rules] == [d["name"] for d in DEFAULT_RULES]


def test_the_report_travels_typed_on_the_bus():
    from llmos import protocol
    alerts, clock, said = make([{**KV, "for": 0}, RESTARTS])
    alerts.evaluate(gauge(0.99))
    clock.t += 1
    alerts.evaluate(gauge(0.1))
    alerts.evaluate(gauge(0.99))
    reply = protocol.QueryReply(query_id="q", alerts=alerts.report())
    back = protocol.decode(protocol.encode(reply))
    assert back.alerts == reply.alerts and back.answer == reply.alerts
    assert [a.state for a in back.alerts.active] == ["firing"] and [a.state for a in back.alerts.recent] == ["resolved"]
    assert back.alerts.rules == {"Kv": "llmos_kv_cache_usage_ratio > 0.95",
                                 "Restarts": "increase(llmos_driver_restarts_total[10m]) > 3"}
