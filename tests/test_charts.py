"""benchmarks/charts.py: fixed figures in, a valid PNG of the promised size out."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import charts  # noqa: E402
from matplotlib.image import imread  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAPTION = charts.footer("Test CPU @ 1.0GHz", "fixed figures")


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 5_000 < len(data) < 150_000, len(data)       # a drawn chart, small enough for docs/img
    height, width = imread(path).shape[:2]
    assert (width, height) == (charts.WIDTH, charts.HEIGHT)


def test_concurrency_chart(tmp_path):
    rows = [{"concurrency": c, "tok_s": 17.0 * c ** 0.7, "ttft_p50": 0.05 * c, "ttft_p90": 0.08 * c}
            for c in (1, 4, 8, 16, 32)]
    out = charts.concurrency(rows, tmp_path / "sub" / "c.png", "llmos: throughput and TTFT", CAPTION)
    assert out == tmp_path / "sub" / "c.png"
    check_png(out)


def test_ttft_by_class_chart(tmp_path):
    groups = {"fcfs": {"interactive, idle": (0.018, 0.104), "interactive, under load": (0.020, 25.9),
                       "batch, under load": (1.2, 8.0)},
              "priority": {"interactive, idle": (0.023, 0.033), "interactive, under load": (0.028, 0.039),
                           "batch, under load": (1.5, 9.0)}}
    check_png(charts.ttft_by_class(groups, tmp_path / "p.png", "TTFT by priority class", CAPTION))


def test_rates_bins_events():
    events = [(10.0, "a", 4), (10.4, "a", 2), (10.6, "b", 1), (11.9, "b", 3), (12.0, "a", 9), (9.9, "a", 9)]
    ts, series = charts.rates(events, start=10.0, end=12.0, bin_s=0.5)
    assert ts == [0.25, 0.75, 1.25, 1.75]
    assert series == {"a": [12.0, 0.0, 0.0, 0.0], "b": [0.0, 2.0, 0.0, 6.0]}


def test_tenant_shares_chart(tmp_path):
    ts = [i + 0.5 for i in range(30)]
    fcfs = {"light": [500.0] * 30, "heavy": [0.0, 0.0] + [500.0] * 28}
    prio = {"light": [1000.0, 1000.0] + [250.0] * 28, "heavy": [0.0, 0.0] + [750.0] * 28}
    out = charts.tenant_shares({"fcfs": (ts, fcfs), "priority": (ts, prio)}, {"light": 1, "heavy": 3},
                               tmp_path / "t.png", "Tenant shares", CAPTION, marks={"heavy joins": 2.0})
    check_png(out)
