#!/usr/bin/env bash
# The main job: install, start llmosd with the built-in model, ask it a real question.
# The daemon keeps running afterwards: `.venv/bin/llmos stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
llmos start --model smollm2
llmos ps
echo "Q: What is the capital of France?"
echo -n "A: "
llmos run smollm2 "What is the capital of France?" --temperature 0 --max-tokens 64
