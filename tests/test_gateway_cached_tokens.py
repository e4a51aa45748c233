"""usage.prompt_tokens_details.cached_tokens of the model-server contract, in the kernel: the
prompt tokens whose KV came from the prefix cache (the daemon's figures: tests/test_tokenize.py)."""
from scheduler_kit import make_request, run_step

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.scheduler import Scheduler


def test_cached_prompt_tokens_are_the_prefix_hits_of_the_first_start_only():
    """usage's cached_tokens (the Scheduler sets it): whole blocks, counted once, not redone by a recompute."""
    sched = Scheduler(KVCacheManager(BlockPool(64, 4)), max_batched_tokens=64)
    first = make_request(list(range(1, 11)), max_tokens=2)
    sched.add(first)
    run_step(sched)
    assert first.kv.cached_prompt_tokens == 0
    second = make_request(list(range(1, 10)) + [99], max_tokens=50)   # shares 9 tokens: 2 full blocks
    sched.add(second)
    run_step(sched)
    assert second.kv.cached_prompt_tokens == 8
    sched._preempt(second, "memory", 0.0)   # by recompute: it finds its own blocks cached now
    run_step(sched)
    assert second.kv.num_computed > 8 and second.kv.cached_prompt_tokens == 8
