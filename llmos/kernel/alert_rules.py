"""Alert rules: a small, validated form, never evaluated as code (docs/alerts.md).

A rule is a condition over one of the kernel's figures, held for a while:

    {name, metric, fn, op, threshold, for, window, quantile, where, part, by, severity, summary}

  metric     a figure the kernel keeps: a /metrics family (docs/metrics.md) or one of the
             two only alerts read (EXTRA_FIGURES)
  fn         value (a gauge's or counter's value now), increase / rate (of a counter over
             `window`), quantile (of a histogram over `window`, with `quantile`), share (of a
             counter's increase over `window`: the series matching `part` over all of them)
  where      {label: pattern or [patterns]}: only the series that match (fnmatch patterns: 5*)
  by         the labels one alert is per (the series are summed by them); default: every label
             for value / increase / rate, none for quantile and share
  for        how long the condition must hold before the alert fires (0: at once)

`parse_rules` merges the configured rules over DEFAULT_RULES by name (a rule with a default's
name changes only the keys it gives; `enabled = false` turns it off) and checks every key:
a bad rule is a ValueError that names the rule and the key.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The figures a rule may name: name -> (kind, label names). The /metrics families are
# kernel/metrics.py's (a test checks this table against a real snapshot).
METRIC_FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmos_requests_total": ("counter", ("model", "tenant", "priority_class", "status", "finish_reason")),
    "llmos_prompt_tokens_total": ("counter", ("model", "tenant", "priority_class")),
    "llmos_generation_tokens_total": ("counter", ("model", "tenant", "priority_class")),
    "llmos_time_to_first_token_seconds": ("histogram", ("model", "priority_class")),
    "llmos_inter_token_latency_seconds": ("histogram", ("model", "priority_class")),
    "llmos_e2e_request_latency_seconds": ("histogram", ("model", "priority_class")),
    "llmos_request_queue_time_seconds": ("histogram", ("model", "priority_class")),
    "llmos_admission_rejections_total": ("counter", ("status", "reason")),
    "llmos_requests_running": ("gauge", ("model", "priority_class")),
    "llmos_requests_waiting": ("gauge", ("model", "priority_class")),
    "llmos_requests_parked": ("gauge", ("model",)),
    "vllm:num_requests_waiting": ("gauge", ()),
    "vllm:num_requests_running": ("gauge", ()),
    "llmos_kv_blocks": ("gauge", ("model", "engine", "state")),
    "llmos_kv_cache_usage_ratio": ("gauge", ("model", "engine")),
    "vllm:kv_cache_usage_perc": ("gauge", ()),
    "vllm:gpu_cache_usage_perc": ("gauge", ()),
    "vllm:cache_config_info": ("gauge", ("block_size", "num_gpu_blocks")),
    "llmos_prefix_cache_queries_total": ("counter", ("model", "engine")),
    "llmos_prefix_cache_hits_total": ("counter", ("model", "engine")),
    "llmos_prefix_cache_lookups_total": ("counter", ("model", "engine")),
    "llmos_preemptions_total": ("counter", ("model", "engine", "cause")),
    "llmos_steps_total": ("counter", ("model", "engine")),
    "llmos_step_seconds_total": ("counter", ("model", "engine")),
    "llmos_step_kernel_seconds_total": ("counter", ("model", "engine")),
    "llmos_step_tokens_total": ("counter", ("model", "engine")),
    "llmos_step_kernel_share": ("gauge", ("model", "engine")),
    "llmos_driver_restarts_total": ("counter", ("driver", "role")),
    "llmos_driver_state": ("gauge", ("driver", "role", "state")),
    "llmos_batch_jobs": ("gauge", ("state",)),
    "llmos_batch_lines_done_total": ("counter", ("result",)),
    "llmos_build_info": ("gauge", ("version", "python")),
    "llmos_metrics_snapshot_timestamp_seconds": ("gauge", ()),
}
# Read by alerts only, from the model host and the job manager (kernel/alert_figures.py).
EXTRA_FIGURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmos_model_failed": ("gauge", ("model",)),                   # 1: its last load failed
    "llmos_batch_job_stalled_seconds": ("gauge", ("job",)),        # an in-progress job: since its last line
}
FIGURES = {**METRIC_FIGURES, **EXTRA_FIGURES}

FNS = {"value": ("gauge", "counter"), "increase": ("counter",), "rate": ("counter",),
       "quantile": ("histogram",), "share": ("counter",)}
WINDOWED = {"increase", "rate", "quantile", "share"}
OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__,
       "==": float.__eq__, "!=": float.__ne__}
SEVERITIES = ("info", "warning", "critical")
KEYS = {"name", "metric", "fn", "op", "threshold", "for", "window", "quantile", "where", "part", "by",
        "severity", "summary", "enabled"}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_FOR_S = MAX_WINDOW_S = 86400.0
MIN_WINDOW_S = 1.0
MAX_THRESHOLD = 1e15
MAX_RULES = 100
MAX_PATTERNS = 16
MAX_SUMMARY = 300

DEFAULT_RULES: list[dict] = [
    {"name": "DriverRestarting", "metric": "llmos_driver_restarts_total", "fn": "increase", "window": "10m",
     "op": ">", "threshold": 3, "for": "0s", "severity": "warning",
     "summary": "driver {driver} restarted {value} times in 10 minutes"},
    {"name": "ModelFailed", "metric": "llmos_model_failed", "fn": "value", "op": "==", "threshold": 1,
     "for": "0s", "severity": "critical", "summary": "model {model} failed to load"},
    {"name": "KVCacheFull", "metric": "llmos_kv_cache_usage_ratio", "fn": "value", "op": ">", "threshold": 0.95,
     "for": "1m", "severity": "warning", "summary": "KV cache of {engine} is {value} full"},
    {"name": "QueueWaitHigh", "metric": "llmos_request_queue_time_seconds", "fn": "quantile", "quantile": 0.95,
     "window": "5m", "by": ["model"], "op": ">", "threshold": 10, "for": "2m", "severity": "warning",
     "summary": "p95 queue wait of {model} is {value} s"},
    {"name": "ErrorRateHigh", "metric": "llmos_requests_total", "fn": "share", "part": {"status": "5*"},
     "window": "5m", "by": ["model"], "op": ">", "threshold": 0.05, "for": "2m", "severity": "critical",
     "summary": "{value} of the requests to {model} failed with a 5xx"},
    {"name": "BatchJobStalled", "metric": "llmos_batch_job_stalled_seconds", "fn": "value", "op": ">",
     "threshold": 600, "for": "0s", "severity": "warning", "summary": "batch job {job} has finished no line for {value} s"},
]


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    fn: str
    op: str
    threshold: float
    for_s: float
    window_s: float | None            # for the windowed fns, else None
    quantile: float | None            # for fn quantile
    where: tuple                      # ((label, (pattern, ...)), ...)
    part: tuple                       # fn share: the numerator's matchers, as `where`
    by: tuple[str, ...]               # the labels of one alert
    severity: str
    summary: str

    def holds(self, value: float) -> bool:
        return OPS[self.op](float(value), float(self.threshold))

    def describe(self) -> str:
        """The rule in one line: increase(llmos_driver_restarts_total[10m]) > 3 for 1m."""
        series = self.metric + (f"{{{_selector(self.where)}}}" if self.where else "")
        if self.fn == "value":
            figure = series
        else:
            extra = f", {self.quantile:g}" if self.quantile else f", {_selector(self.part)}" if self.part else ""
            figure = f"{self.fn}({series}[{_secs(self.window_s)}]{extra})"
            figure += f" by ({', '.join(self.by)})" if self.by and self.fn in ("quantile", "share") else ""
        return f"{figure} {self.op} {self.threshold:g}" + (f" for {_secs(self.for_s)}" if self.for_s else "")


def _selector(matchers: tuple) -> str:
    return ",".join(f"{label}={'|'.join(patterns)}" for label, patterns in matchers)


def _secs(s: float) -> str:
    return f"{s / 60:g}m" if s >= 60 and s % 60 == 0 else f"{s:g}s"


def parse_duration(value, what: str) -> float:
    """Seconds from a number or a string like 500ms, 90s, 10m, 1h, 1d."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := DURATION.match(value.strip())):
        seconds = float(m.group(1)) * UNITS[m.group(2)]
    else:
        raise ValueError(f"{what}: {value!r} is not a duration (a number of seconds, or e.g. 90s, 10m, 1h)")
    if not math.isfinite(seconds):
        raise ValueError(f"{what}: {value!r} is not a duration")
    return seconds


def parse_rules(items: list[dict] | None, defaults: bool = True) -> list[Rule]:
    """The effective rules: `items` merged over DEFAULT_RULES by name (defaults=True), each
    checked. None means the defaults alone. Raises ValueError naming the rule and the key."""
    if items is None:
        items = []
    if not isinstance(items, list):
        raise ValueError(f"alert rules: give a list of rules, not {type(items).__name__}")
    merged = {d["name"]: dict(d) for d in DEFAULT_RULES} if defaults else {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"alert rule #{i + 1}: give a table of keys, not {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"alert rule #{i + 1}: name: {name!r} is not a name (a letter, then letters, digits "
                             f"or _, at most 64)")
        merged[name] = {**merged[name], **item} if name in merged else dict(item)
    rules = [parse_rule(r) for r in merged.values() if r.get("enabled", True) is not False]
    if len(rules) > MAX_RULES:
        raise ValueError(f"alert rules: {len(rules)} rules; at most {MAX_RULES}")
    return rules


def rules_or_defaults(items: list[dict] | None) -> list[Rule]:
    """For the kernel at start: parse_rules(items), or, when they are bad, the defaults and
    an error in the log (the config file's check names the line; a bad rule never stops the daemon)."""
    try:
        return parse_rules(items)
    except ValueError as exc:
        log.error("alert rules not applied, the defaults are: %s", exc)
        return parse_rules(None)


def parse_rule(d: dict) -> Rule:
    name = d.get("name")
    where = f"alert rule {name!r}"

    def bad(key: str, problem: str) -> ValueError:
        return ValueError(f"{where}: {key}: {problem}")
    unknown = set(d) - KEYS
    if unknown:
        raise bad(sorted(unknown)[0], f"unknown key (known: {', '.join(sorted(KEYS))})")
    if not isinstance(d.get("enabled", True), bool):
        raise bad("enabled", "give true or false")
    metric = d.get("metric")
    if metric not in FIGURES:
        raise bad("metric", f"{metric!r} is not a figure the kernel keeps (see docs/alerts.md; e.g. "
                            f"{', '.join(list(FIGURES)[:3])})")
    kind, labels = FIGURES[metric]
    fn = d.get("fn", "value")
    if fn not in FNS:
        raise bad("fn", f"{fn!r} is not one of {', '.join(FNS)}")
    if kind not in FNS[fn]:
        raise bad("fn", f"{fn} needs a {' or '.join(FNS[fn])}; {metric} is a {kind}")
    op = d.get("op")
    if op not in OPS:
        raise bad("op", f"{op!r} is not one of {' '.join(OPS)}")
    threshold = d.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or abs(threshold) > MAX_THRESHOLD:
        raise bad("threshold", f"{threshold!r} is not a finite number within ±{MAX_THRESHOLD:g}")
    if fn == "share" and not 0 <= threshold <= 1:
        raise bad("threshold", f"a share is from 0 to 1, not {threshold}")
    for_s = parse_duration(d.get("for", 0), f"{where}: for")
    if not 0 <= for_s <= MAX_FOR_S:
        raise bad("for", f"{for_s:g} s is not from 0 to {MAX_FOR_S:g} s")
    window_s = None
    if fn in WINDOWED:
        if "window" not in d:
            raise bad("window", f"{fn} needs a window (e.g. 5m)")
        window_s = parse_duration(d["window"], f"{where}: window")
        if not MIN_WINDOW_S <= window_s <= MAX_WINDOW_S:
            raise bad("window", f"{window_s:g} s is not from {MIN_WINDOW_S:g} to {MAX_WINDOW_S:g} s")
    elif "window" in d:
        raise bad("window", f"fn {fn} reads the figure now; a window is for {', '.join(sorted(WINDOWED))}")
    quantile = d.get("quantile")
    if (fn == "quantile") != (quantile is not None):
        raise bad("quantile", "give it with fn quantile, and only then")
    if quantile is not None and (isinstance(quantile, bool) or not isinstance(quantile, (int, float))
                                 or not 0 < quantile < 1):
        raise bad("quantile", f"{quantile!r} is not a number between 0 and 1")
    matchers = _matchers(d.get("where", {}), labels, bad, "where")
    part = _matchers(d.get("part", {}), labels, bad, "part")
    if (fn == "share") != bool(part):
        raise bad("part", "share needs part (the series counted, e.g. {status = \"5*\"}); only share takes it")
    by = d.get("by", list(labels) if fn in ("value", "increase", "rate") else [])
    if not isinstance(by, list) or any(b not in labels for b in by) or len(set(by)) != len(by):
        raise bad("by", f"{by!r}: give a list of {metric}'s labels ({', '.join(labels) or 'it has none'})")
    severity = d.get("severity", "warning")
    if severity not in SEVERITIES:
        raise bad("severity", f"{severity!r} is not one of {', '.join(SEVERITIES)}")
    summary = d.get("summary", f"{name}: {{value}}")
    if not isinstance(summary, str) or len(summary) > MAX_SUMMARY:
        raise bad("summary", f"give a text of at most {MAX_SUMMARY} characters")
    for placeholder in PLACEHOLDER.findall(summary):
        if placeholder not in by and placeholder not in ("value", "threshold"):
            raise bad("summary", f"{{{placeholder}}} is neither a label of the alert ({', '.join(by) or 'none'}) "
                                 f"nor value or threshold")
    return Rule(name=name, metric=metric, fn=fn, op=op, threshold=float(threshold), for_s=for_s, window_s=window_s,
                quantile=float(quantile) if quantile is not None else None, where=matchers, part=part, by=tuple(by),
                severity=severity, summary=summary)


def _matchers(value, labels: tuple, bad, key: str) -> tuple:
    if not isinstance(value, dict):
        raise bad(key, f"give a table of label = pattern, not {type(value).__name__}")
    out = []
    for label, patterns in value.items():
        if label not in labels:
            raise bad(key, f"{label!r} is not a label of the figure ({', '.join(labels) or 'it has none'})")
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not 1 <= len(patterns) <= MAX_PATTERNS or \
                not all(isinstance(p, str) and 0 < len(p) <= 128 for p in patterns):
            raise bad(key, f"{label}: give a pattern or a list of at most {MAX_PATTERNS}")
        out.append((label, tuple(patterns)))
    return tuple(out)
