"""docs/prometheus/alerts.yml: valid Prometheus rules (promtool check rules), whose unit tests
pass (promtool test rules), over names llmosd really serves, and the same six as the kernel's
defaults. promtool comes from Debian's prometheus package (scripts/install.sh); without it the
promtool tests skip."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmos.kernel.alert_rules import DEFAULT_RULES, METRIC_FIGURES

RULES = Path(__file__).resolve().parent.parent / "docs" / "prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool is not installed (apt-get install prometheus)")


@needs_promtool
def test_promtool_checks_the_rules():
    done = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(DEFAULT_RULES)} rules found" in done.stdout


@needs_promtool
def test_the_rules_unit_tests_pass():
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_same_rules_as_the_kernel_s_over_names_llmosd_serves():
    text = (RULES / "alerts.yml").read_text()
    assert re.findall(r"- alert: (\w+)", text) == [r["name"] for r in DEFAULT_RULES]
    exprs = " ".join(re.findall(r"expr: (>\n(?:\s{10,}.*\n)+|.*)", text))
    names = set(re.findall(r"\b(llmos_[a-z_]+)", exprs))
    served = set(METRIC_FIGURES) | {f"{n}_bucket" for n, (kind, _) in METRIC_FIGURES.items() if kind == "histogram"}
    assert names and names <= served, names - served
