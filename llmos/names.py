"""Names that the kernel reports and its clients read back, declared once. Neutral ground:
the kernel builds its types from them (requests.State, the policy's classes) and the CLI
lays out its views with them, without importing the kernel.
"""
from __future__ import annotations

# Priority classes, index = class number (lower runs first); "batch:3" names a level in a class.
PRIORITY_CLASSES = ("realtime", "interactive", "batch")

# A request's states in the kernel, in the order of its life (requests.State has one member each).
TOKENIZING = "tokenizing"   # waiting for the tokenizer driver
FORKING = "forking"         # choice 1..n-1 of an n > 1 request: waits for choice 0's prompt
WAITING = "waiting"         # queued for the scheduler (also after preemption)
RUNNING = "running"         # in the running batch, owns blocks
FINISHING = "finishing"     # done generating, blocks freed, final text in flight
DONE = "done"               # final output sent; removed from the table
REQUEST_STATES = (TOKENIZING, FORKING, WAITING, RUNNING, FINISHING, DONE)

# How `ps` shows a WAITING request that was preempted, or whose KV is swapped out to the host;
# and a request that waits for its model to load (not admitted yet: kernel/parking.py).
PREEMPTED, SWAPPED, LOADING = "preempted", "swapped", "loading"
# Every state a request in `ps` can show, in the order of its life (DONE ones have left the table).
SHOWN_STATES = (LOADING, TOKENIZING, FORKING, WAITING, PREEMPTED, SWAPPED, RUNNING, FINISHING)

# A model's residency (kernel/residency.py), as /v1/models and `llmos models` show it.
MODEL_STATES = ("unloaded", "loading", "loaded", "unloading", "failed")
