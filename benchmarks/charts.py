"""PNG charts of the benchmarks' figures (matplotlib, Agg backend: no screen needed).

Optional: `pip install -e ".[bench]"`. A benchmark imports this module only when asked for a
chart (`--chart`), so the figures themselves never need matplotlib.

Every chart carries a caption line at its foot (see footer()): the CPU, its cores and the
date, because figures only compare within one run on one machine. Each function takes the
figures a benchmark printed, writes one PNG of WIDTH x HEIGHT pixels at `path` (its folder
made if missing) and returns the path.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WIDTH, HEIGHT, DPI = 900, 420, 100


def footer(cpu: str, note: str = "") -> str:
    """The caption every chart carries: CPU model, cores, date, and `note` (model, workload, load)."""
    parts = [cpu, f"{os.cpu_count()} cores", datetime.date.today().isoformat()]
    return ", ".join(parts) + (f" | {note}" if note else "")


def _figure(ncols: int, title: str, caption: str):
    fig, axes = plt.subplots(1, ncols, figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, squeeze=False)
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, caption, fontsize=7, color="0.35", ha="left", va="bottom")
    return fig, list(axes[0])


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))   # leave the foot to the caption; keeps WIDTH x HEIGHT
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def concurrency(rows: list[dict], path: str | Path, title: str, caption: str) -> Path:
    """Throughput and TTFT against concurrency. `rows`: one dict per concurrency level with
    `concurrency`, `tok_s` (output tokens/s) and `ttft_p50` (seconds; `ttft_p90` optional)."""
    rows = sorted(rows, key=lambda r: r["concurrency"])
    xs = [r["concurrency"] for r in rows]
    fig, (left, right) = _figure(2, title, caption)
    left.plot(xs, [r["tok_s"] for r in rows], "o-", color="tab:blue")
    left.set_ylabel("output tokens/s")
    left.set_ylim(bottom=0)
    right.plot(xs, [r["ttft_p50"] for r in rows], "o-", color="tab:orange", label="p50")
    if all(r.get("ttft_p90") is not None for r in rows):
        right.plot(xs, [r["ttft_p90"] for r in rows], "s--", color="tab:red", label="p90")
    right.set_ylabel("time to first token (s)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    for ax, name in ((left, "Throughput"), (right, "Time to first token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent requests")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def ttft_by_class(groups: dict[str, dict[str, tuple[float, float]]], path: str | Path, title: str,
                  caption: str) -> Path:
    """TTFT by priority class, one bar group per scheduler. `groups`: scheduler -> class label
    -> (p50, p95) in seconds. Solid bars are p50, pale bars behind them p95; log scale, since
    a queued request waits orders of magnitude longer than an admitted one."""
    fig, (ax,) = _figure(1, title, caption)
    labels = list(dict.fromkeys(c for g in groups.values() for c in g))
    width = 0.8 / max(1, len(labels))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        p50 = [groups[s].get(label, (0, 0))[0] for s in groups]
        p95 = [groups[s].get(label, (0, 0))[1] for s in groups]
        color = colors[i % len(colors)]
        ax.bar(xs, p95, width * 0.9, color=color, alpha=0.35)
        ax.bar(xs, p50, width * 0.9, color=color, label=label)
        for x, a, b in zip(xs, p50, p95):
            ax.annotate(f"{_ms(a)} / {_ms(b)}", (x, max(a, b)), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 8)   # room for the legend above the tallest bar
    ax.set_xticks(range(len(groups)), [f"{s} scheduler" for s in groups])
    ax.set_ylabel("time to first token (s, log scale)\nsolid p50, pale p95")
    ax.legend(fontsize=8, loc="upper center", ncol=len(labels))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def rates(events: list[tuple[float, str, int]], start: float, end: float, bin_s: float
          ) -> tuple[list[float], dict[str, list[float]]]:
    """Bin (time, series, count) events into tokens/s per series: the bins' mid-times
    (seconds after `start`) and each series' rate per bin. Events outside [start, end) are dropped."""
    n = max(1, int((end - start) // bin_s))
    out: dict[str, list[float]] = {}
    for t, name, count in events:
        i = int((t - start) // bin_s)
        if 0 <= i < n:
            out.setdefault(name, [0.0] * n)[i] += count / bin_s
    return [(i + 0.5) * bin_s for i in range(n)], out


def tenant_shares(panels: dict[str, tuple[list[float], dict[str, list[float]]]], weights: dict[str, float],
                  path: str | Path, title: str, caption: str, marks: dict[str, float] | None = None) -> Path:
    """Tokens/s per tenant over time, stacked, one panel each. `panels`: panel title (e.g. the
    scheduler) -> (bin mid-times in s, tenant -> tokens/s per bin), as rates() returns; `weights`: tenant ->
    weight (in the legend); `marks`: label -> time (s) of a vertical line, e.g. a tenant joining."""
    fig, axes = _figure(len(panels), title, caption)
    top = max((sum(v[i] for v in series.values()) for ts, series in panels.values() for i in range(len(ts))),
              default=1.0)
    for ax, (name, (ts, series)) in zip(axes, panels.items()):
        names = [t for t in weights if t in series]
        ax.stackplot(ts, *[series[t] for t in names], labels=[f"{t} (weight {weights[t]:g})" for t in names],
                     alpha=0.85)
        for label, x in (marks or {}).items():
            ax.axvline(x, color="0.2", ls=":", lw=1)
            ax.annotate(f" {label}", (x, top * 1.1), fontsize=7, ha="left", va="top", rotation=90)
        ax.set_ylim(0, top * 1.12)
        ax.set_xlim(0, ts[-1] + (ts[1] - ts[0]) / 2 if len(ts) > 1 else None)
        ax.set_xlabel("time since the first tenant started (s)")
        ax.set_ylabel("tokens/s received")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return _save(fig, path)
