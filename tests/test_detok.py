"""Incremental detokenization and stop strings, with the real smollm2 tokenizer."""
import pytest
from hypothesis import given, settings, strategies as st

from llmos import protocol
from llmos.drivers.tokenizer.__main__ import TokenizerDriver
from llmos.drivers.tokenizer.detok import DetokState


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


TEXT = "Paris is the capital of France. Ça coûte 5€ — naïve café 🙂 done."


def stream(state, ids, step=1):
    out, hit = "", False
    for i in range(0, len(ids), step):
        final = i + step >= len(ids)
        delta, hit = state.feed(ids[i:i + step], final=final)
        out += delta
        if hit:
            break
    return out, hit


@pytest.mark.parametrize("step", [1, 2, 5])
def test_streamed_text_equals_one_shot_decode(tok, step):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    text, hit = stream(DetokState(tok, [], []), ids, step)
    assert text == tok.decode(ids, skip_special_tokens=True) and not hit


def test_stop_string_truncates_and_is_never_streamed_partially(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    state = DetokState(tok, ["capital of"], [])
    pieces = []
    for i, t in enumerate(ids):
        delta, hit = state.feed([t], final=False)
        pieces.append(delta)
        if hit:
            break
    assert hit and "".join(pieces) == "Paris is the "
    assert not any("capital" in p or "cap" in p for p in pieces)


def test_rebuilt_state_continues_without_gap_or_repeat(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    first, _ = stream(DetokState(tok, [], []), ids[:7])
    rest, _ = stream(DetokState(tok, [], ids[:7]), ids[7:])
    assert first + rest == tok.decode(ids)


def test_a_successor_picks_up_a_character_its_predecessor_held_back(tok):
    """The kernel re-sends as prior every token the old tokenizer answered for, including
    the bytes of an unfinished character whose text it held back: none may be lost."""
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    emoji = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1   # byte tokens: a split inside them is the case under test
    broken = ids + emoji[:-1] + tok(" after", add_special_tokens=False)["input_ids"]   # never completed
    for seq in (ids, broken):
        want = tok.decode(seq, skip_special_tokens=True)
        for k in range(1, len(seq)):
            old = DetokState(tok, [], [])
            first = "".join(old.feed([t], final=False)[0] for t in seq[:k])
            rest, _ = stream(DetokState(tok, [], seq[:k]), seq[k:])
            assert first + rest == want, f"split after token {k}"


def test_driver_encodes_chat_and_streams_deltas_with_logprobs(tok):
    drv = TokenizerDriver(tok)
    enc = drv.encode(protocol.Encode(request_id="r", prompt=None,
                                     messages=[{"role": "user", "content": "Hi"}]))
    assert enc.error is None
    assert tok.decode(enc.token_ids.tolist()).endswith("<|im_start|>assistant\n")
    bad = drv.encode(protocol.Encode(request_id="r2", prompt=None, messages=[{"content": 3}]))
    assert bad.error and "role" in bad.error
    ids = tok(" Paris", add_special_tokens=False)["input_ids"]
    out = drv.detokenize(protocol.Detokenize(items=[protocol.DetokItem(
        rid="r", ids=ids, prior=[], lp=[[-0.5, [[ids[0], -0.5]]]] * len(ids), stop=[], finish="length")]))
    (item,) = protocol.decode(protocol.encode(out)).items   # the real round trip
    assert item.text == " Paris" and item.finish == "length" and item.n == len(ids)
    assert item.lp[0]["logprob"] == -0.5 and item.lp[0]["top_logprobs"][0]["token"] == " Paris"
    # finished: later tokens still in flight for this request are ignored
    assert drv.detokenize(protocol.Detokenize(items=[protocol.DetokItem(
        rid="r", ids=[5], prior=None, lp=None, stop=None, finish=None)])).items == []


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text("ab", max_size=12), st.lists(st.text("ab", min_size=1, max_size=30), max_size=8))
def test_stop_matcher_knows_the_longest_partial_stop_after_every_piece(stop, pieces):
    """The linear matcher agrees with the quadratic definition it replaced, piece by piece."""
    from llmos.drivers.tokenizer.detok import _StopMatcher
    if not stop:
        return
    m, text = _StopMatcher(stop), ""
    for piece in pieces:
        m.feed(piece)
        text += piece
        brute = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert m.partial == brute


def test_a_request_id_used_again_after_it_finished_gets_its_text(tok):
    drv = TokenizerDriver(tok)
    ids = tok(" Paris", add_special_tokens=False)["input_ids"]
    for _ in range(2):
        out = drv.detokenize(protocol.Detokenize(items=[protocol.DetokItem(
            rid="again", ids=ids, prior=[], lp=None, stop=None, finish="length")]))
        assert [d.text for d in out.items] == [" Paris"]
    # late tokens of the finished request (no prior) are still ignored
    assert drv.detokenize(protocol.Detokenize(items=[protocol.DetokItem(
        rid="again", ids=[5], prior=None, lp=None, stop=None, finish=None)])).items == []
