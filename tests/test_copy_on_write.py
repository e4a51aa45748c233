"""Copy-on-write sharing for n > 1: exact block ids and reference counts, invariants under
random operations, and a 200-request churn with n > 1 that must end with an empty pool."""
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_kit import apply, drain, expected_output, make_request, run_step, token_at

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import Request, State
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.swap import SwapSpace


def req(i, prompt, max_tokens=100, state=State.TOKENIZING):
    return make_request(list(prompt), i=i, max_tokens=max_tokens, state=state)


def prefilled(kv, prompt_len, i=0):
    """The KV manager alone (no scheduler): a prompt written and committed."""
    r = req(i, range(prompt_len))
    assert kv.allocate_slots(r, prompt_len)
    r.kv.num_computed = prompt_len
    kv.commit(r)
    return r


def forked(kv, parent, i):
    child = req(i, parent.prompt_ids)
    kv.fork(parent, child)
    child.kv.num_computed = parent.kv.num_computed - 1
    return child


def owners(kv, *reqs):
    out = {r.id: r.kv.blocks for r in reqs if r.kv.blocks}
    if kv.copy_sources:
        out["copies"] = kv.copy_sources
    return out


def test_fork_shares_every_block_with_one_more_reference():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    parent = prefilled(kv, 6)
    child = forked(kv, parent, 1)
    assert parent.kv.blocks == child.kv.blocks == [0, 1]
    assert [pool.ref_count(b) for b in (0, 1)] == [2, 2]
    assert pool.num_used == 2
    pool.check_integrity(owners(kv, parent, child))


def test_the_first_write_into_a_shared_block_copies_it_and_the_source_is_held_until_the_step_ran():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    parent = prefilled(kv, 6)
    child = forked(kv, parent, 1)
    assert kv.allocate_slots(child, 1)          # rewrites position 5, in shared block 1
    assert child.kv.blocks == [0, 2] and kv.copy_ops() == [(1, 2)]
    assert pool.ref_count(1) == 2               # the parent and the copy in flight
    pool.check_integrity(owners(kv, parent, child))
    kv.step_done()
    assert pool.ref_count(1) == 1 and kv.copy_ops() == []
    pool.check_integrity(owners(kv, parent, child))


def test_the_last_owner_writes_in_place_so_n_choices_cost_n_minus_1_copies():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    parent = prefilled(kv, 6)
    children = [forked(kv, parent, i) for i in (1, 2)]
    for c in children:
        assert kv.allocate_slots(c, 1)
    assert kv.allocate_slots(parent, 1)          # position 6, block 1: only the parent owns it now
    assert parent.kv.blocks == [0, 1]
    assert kv.copy_ops() == [(1, 2), (1, 3)] and [c.kv.blocks for c in children] == [[0, 2], [0, 3]]
    kv.step_done()
    assert [pool.ref_count(b) for b in range(4)] == [3, 1, 1, 1]
    pool.check_integrity(owners(kv, parent, *children))


def test_full_prompt_blocks_stay_shared_and_only_the_written_one_is_copied():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    parent = prefilled(kv, 8)                    # two full blocks, both in the prefix cache
    child = forked(kv, parent, 1)
    assert kv.allocate_slots(child, 2)           # positions 7 (block 1, shared) and 8 (a new block)
    assert kv.copy_ops() == [(1, 3)] and child.kv.blocks == [0, 3, 2]
    assert child.kv.cached_blocks == 1              # its copy of block 1 is registered again on commit
    kv.step_done()
    child.kv.num_computed = 9
    kv.commit(child)
    assert child.kv.cached_blocks == 2 and pool.ref_count(0) == 2


def test_a_lost_step_makes_the_writer_recompute_and_releases_the_copy_source():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    parent = prefilled(kv, 6)
    child = forked(kv, parent, 1)
    assert kv.allocate_slots(child, 1)
    kv.step_lost()
    assert child.kv.blocks == [] and child.kv.num_computed == 0 and child.num_tokens == 6
    assert [pool.ref_count(b) for b in (0, 1, 2)] == [1, 1, 0]
    pool.check_integrity(owners(kv, parent, child))


def test_a_copy_that_does_not_fit_changes_nothing():
    pool = BlockPool(2, 4)
    kv = KVCacheManager(pool)
    parent = prefilled(kv, 6)
    child = forked(kv, parent, 1)
    assert not kv.allocate_slots(child, 1)
    assert child.kv.blocks == [0, 1] and kv.copy_ops() == [] and pool.ref_count(1) == 2


def test_the_scheduler_forks_waiting_choices_and_frees_everything_at_the_end():
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool), max_batched_tokens=64)
    parent = req(0, range(6), max_tokens=3)
    parent.forks = [req(i, range(6), max_tokens=3, state=State.FORKING) for i in (1, 2)]
    choices = [parent, *parent.forks]
    sched.add(parent)
    run_step(sched)                           # the prompt's step forks the choices
    assert all(c.state is State.WAITING and c.kv.num_computed == 5 and c.kv.blocks == [0, 1] for c in sched.waiting)
    assert sched.waiting == choices[1:] and parent.output.ids == [token_at(0, 6)]
    batch = sched.schedule()
    assert [(s.req.id, s.num_new) for s in batch] == [("r0", 1), ("r1", 1), ("r2", 1)]
    assert sorted(sched.kv.copy_ops()) == [(1, 2), (1, 3)]   # the choices copy, the parent writes in place
    apply(sched, batch)
    assert sched.kv.copy_ops() == [] and [c.output.ids for c in choices[1:]] == [[token_at(1, 6)], [token_at(2, 6)]]
    drain(sched)                              # each choice samples its own tokens up to max_tokens
    for c in choices:
        assert (c.state, c.output.finish_reason, c.output.ids) == (State.FINISHING, "length", expected_output(c))
        assert len(c.output.ids) == 3
    assert pool.num_used == 0
    pool.check_integrity({})


class ShadowKV:
    """What the model driver would hold: per block the token written at each slot. Copies
    and swaps move contents as the driver does; `check` says every request reads its own."""

    def __init__(self, kv, bs):
        self.kv, self.bs, self.dev, self.host, self.copied = kv, bs, {}, {}, 0

    def run_copies(self):
        for src, dst in self.kv.copy_ops()[self.copied:]:
            self.dev[dst] = list(self.dev.get(src, [None] * self.bs))
        self.copied = len(self.kv.copy_ops())

    def write(self, r, start, end):
        self.run_copies()
        tokens = r.prompt_ids + r.output.ids
        for p in range(start, end):
            self.dev.setdefault(r.kv.blocks[p // self.bs], [None] * self.bs)[p % self.bs] = tokens[p]

    def move(self, pairs, src, dst):
        for a, b in pairs:
            dst[b] = list(src.get(a, [None] * self.bs))

    def check(self, live):
        for r in live:
            if r.kv.host_blocks:
                continue
            tokens = r.prompt_ids + r.output.ids
            seen = [self.dev.get(r.kv.blocks[p // self.bs], [None] * self.bs)[p % self.bs] for p in range(r.kv.num_computed)]
            assert seen == tokens[: r.kv.num_computed], f"{r.id} reads KV it did not write"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("aafggxosdl"), st.integers(0, 5), st.integers(1, 9)), max_size=60))
def test_random_allocate_append_fork_free_evict_swap_keep_invariants(ops):
    """a: new request (prefix hits), g: append tokens, f: fork, x: free, o/s: swap out/in,
    d/l: the step ran / was lost. Eviction happens inside allocate when the pool is short.
    Besides the books, a shadow of the pool's contents proves no write lands in a block
    another request still reads."""
    pool, host = BlockPool(10, 2), BlockPool(12, 2)
    kv = KVCacheManager(pool)
    swap = SwapSpace(host, block_bytes=1, mode="swap")
    shadow = ShadowKV(kv, 2)
    reqs: dict[int, Request] = {}
    for op, key, n in ops:
        r = reqs.get(key)
        if op == "a" and r is None:
            r = reqs[key] = req(key, [t % 3 for t in range(n)])
            kv.attach_prefix(r)
        elif op == "g" and r is not None and not r.kv.host_blocks:
            if r.kv.num_computed == r.num_tokens:
                r.output.ids.extend([key + 10 * i for i in range(n)])   # tokens of its own: sharing shows
            grow = r.num_tokens - r.kv.num_computed
            if kv.allocate_slots(r, grow):
                shadow.write(r, r.kv.num_computed, r.num_tokens)
                r.kv.num_computed += grow
                kv.commit(r)
        elif op == "f" and r is not None and r.kv.blocks and r.kv.num_computed and (key + 1) % 6 not in reqs:
            child = reqs[(key + 1) % 6] = req((key + 1) % 6, (r.prompt_ids + r.output.ids)[: r.kv.num_computed])
            kv.fork(r, child)
            child.kv.num_computed = r.kv.num_computed - 1
        elif op == "x" and r is not None:
            swap.drop(r)
            kv.free(reqs.pop(key))
        elif op == "o" and r is not None and r.kv.blocks and swap.should_swap(r):
            swap.swap_out(r, kv)
            pairs = swap.ops()[0][-len(r.kv.host_blocks):]
            shadow.move(pairs, shadow.dev, shadow.host)
        elif op == "s" and r is not None and r.kv.host_blocks:
            if swap.swap_in(r, kv):
                shadow.move(swap.ops()[1][-len(r.kv.blocks):], shadow.host, shadow.dev)
        elif op in "dl":
            shadow.run_copies()
            (kv.step_done if op == "d" else kv.step_lost)()
            (swap.step_done if op == "d" else swap.step_lost)()
            shadow.copied = 0
        live = list(reqs.values())
        pool.check_integrity(owners(kv, *live))
        used = {b for v in live for b in v.kv.blocks} | set(kv.copy_sources)
        assert pool.num_free + len(used) == pool.num_blocks
        shadow.check(live)
    kv.step_done()
    swap.step_done()
    for key in list(reqs):
        swap.drop(reqs[key])
        kv.free(reqs.pop(key))
    pool.check_integrity({})
    assert pool.num_used == 0 and host.num_used == 0


def test_leak_200_requests_with_n_up_to_4_random_lengths_cancellations_and_swap():
    rng = random.Random(1)
    pool = BlockPool(48, 4)
    sched = Scheduler(KVCacheManager(pool), max_num_seqs=16, max_batched_tokens=64,
                      swap=SwapSpace(BlockPool(24, 4), block_bytes=1, mode="auto", recompute_tokens_per_s=1.0))
    shared = list(range(12))
    live, next_id, reasons = [], 0, Counter()
    while next_id < 200 or live:
        while len(live) < 24 and next_id < 200:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1000) for _ in range(rng.randint(1, 20))]
            r = req(next_id, prompt, max_tokens=rng.randint(1, 30))
            r.forks = [req(1000 * (i + 1) + next_id, prompt, r.max_tokens, State.FORKING)
                       for i in range(rng.choice([0, 0, 1, 3]))]
            next_id += 1
            sched.add(r)
            live += [r, *r.forks]
        run_step(sched, lost=rng.random() < 0.05)   # a lost step applies nothing: it is planned again
        for r in list(live):
            if r.state is State.FINISHING:
                continue   # ended in the step (length) or with its parent above
            if r.state is not State.FORKING and rng.random() < 0.02:   # cancel; choices not forked yet go too
                sched.finish_requests([r, *r.forks], "abort")
        for r in list(live):
            if r.state is State.FINISHING:
                assert r.output.ids == expected_output(r), r.id
                assert r.output.finish_reason == "abort" or len(r.output.ids) == r.max_tokens, r.id
                reasons[r.output.finish_reason] += 1
                r.to(State.DONE)
                live.remove(r)
        sched.check_integrity()
    assert sched.kv.forks > 0 and sched.kv.copies > 0 and sched.preemptions > 0 and reasons["length"] > 100
    assert sched.swap.stats()["swap_ins"] > 0 and sched.swap.stats()["fallbacks_to_recompute"] > 0   # lost swap-outs
    assert pool.num_free == pool.num_blocks and pool.num_used == 0
    pool.check_integrity({})
    assert sched.swap.host.num_used == 0
