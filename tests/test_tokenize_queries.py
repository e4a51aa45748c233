"""The kernel's tokenize and detokenize queries (kernel/tokenize_queries.py) with real message
types and a fake model host: every query is answered, whatever its tokenizer does."""
from __future__ import annotations

import types

import pytest

from llmos import protocol
from llmos.kernel.auth import KERNEL, Principal
from llmos.kernel.tokenize_queries import STALE_S, TokenizeQueries

TOK = "tokenizer-m"


class Door:
    def __init__(self):
        self.sent: list = []
        self.state = {TOK: ("running", None)}
        self.engine = types.SimpleNamespace(loaded=True, tokenizer=TOK, max_model_len=128,
                                            info=types.SimpleNamespace(vocab_size=100))
        host = types.SimpleNamespace(known=lambda m: m in ("m", "cold"),
                                     route=lambda s: self.engine if s.model == "m" else None)
        self.now = 0.0
        self.q = TokenizeQueries(host, {}, lambda peer, msg: self.sent.append((peer, msg)), self.state.__getitem__,
                                 clock=lambda: self.now)

    def ask(self, what="tokenize", principal=KERNEL, **args) -> str:
        qid = f"q{len(self.sent)}"
        self.q.ask("io", protocol.Query(query_id=qid, what=what, args=args), principal)
        return qid

    def to_tokenizer(self):
        peer, msg = self.sent.pop()
        assert peer == TOK
        return msg

    def reply(self, qid: str) -> dict:
        [(peer, msg)] = [x for x in self.sent if isinstance(x[1], protocol.QueryReply) and x[1].query_id == qid]
        assert peer == "io" and msg.ok
        return msg.data


def error(data: dict) -> tuple:
    return data["error"]["status"], data["error"]["param"]


def test_a_tokenize_query_is_an_encode_answered_with_the_tokenizers_ids():
    door = Door()
    qid = door.ask(model="m", messages=[{"role": "user", "content": "hi"}], add_generation_prompt=False)
    enc = door.to_tokenizer()
    assert isinstance(enc, protocol.Encode) and enc.messages and not enc.add_generation_prompt
    assert not door.q.encoded("someone-else", protocol.Encoded(request_id="cmpl-1", token_ids=protocol.i32([1]),
                                                               error=None))   # a generation request's
    assert door.q.encoded("impostor", protocol.Encoded(request_id=enc.request_id, token_ids=protocol.i32([9]),
                                                       error=None))   # ours, from the wrong driver: dropped
    assert door.sent == []
    assert door.q.encoded(TOK, protocol.Encoded(request_id=enc.request_id, token_ids=protocol.i32([3, 4]), error=None))
    assert door.reply(qid) == {"count": 2, "max_model_len": 128, "tokens": [3, 4]} and not door.q.pending


def test_a_detokenize_query_is_a_decode_and_a_template_error_is_a_400():
    door = Door()
    qid = door.ask("detokenize", model="m", tokens=[1, 2])
    dec = door.to_tokenizer()
    assert isinstance(dec, protocol.Decode) and dec.token_ids.tolist() == [1, 2]
    door.q.decoded(TOK, protocol.Decoded(request_id=dec.request_id, text="ab", error=None))
    assert door.reply(qid) == {"prompt": "ab"}
    qid = door.ask(model="m", prompt="x")
    enc = door.to_tokenizer()
    door.q.encoded(TOK, protocol.Encoded(request_id=enc.request_id, token_ids=protocol.i32([]), error="bad"))
    assert error(door.reply(qid)) == (400, "prompt")


def test_pending_queries_answer_503_when_their_tokenizer_dies_and_a_down_one_is_refused_at_once():
    door = Door()
    first, second = door.ask(model="m", prompt="a"), door.ask("detokenize", model="m", tokens=[5])
    door.q.tokenizer_down("model-m")   # another driver: nothing to answer
    assert not any(isinstance(m, protocol.QueryReply) for _, m in door.sent)
    door.q.tokenizer_down(TOK)
    assert error(door.reply(first))[0] == error(door.reply(second))[0] == 503 and not door.q.pending
    door.state[TOK] = ("backoff", "killed")
    assert error(door.reply(door.ask(model="m", prompt="a")))[0] == 503


def test_a_query_its_tokenizer_never_answers_is_answered_504_later():
    door = Door()
    qid = door.ask(model="m", prompt="a")
    door.now = STALE_S + 1
    door.ask(model="m", prompt="b")   # each new query sweeps the stale ones
    assert error(door.reply(qid))[0] == 504 and len(door.q.pending) == 1


@pytest.mark.parametrize("what, args, expected", [
    ("tokenize", {"model": "nope", "prompt": "a"}, (404, "model")),
    ("tokenize", {"model": "cold", "prompt": "a"}, (503, None)),
    ("tokenize", {"prompt": "a"}, (400, "model")),
    ("tokenize", {"model": "m"}, (400, "prompt")),
    ("tokenize", {"model": "m", "prompt": "a", "messages": []}, (400, "prompt")),
    ("tokenize", {"model": "m", "prompt": 3}, (400, "prompt")),
    ("tokenize", {"model": "m", "messages": "hi"}, (400, "messages")),
    ("tokenize", {"model": "m", "prompt": "a", "return_token_strs": 1}, (400, "return_token_strs")),
    ("tokenize", {"model": "m", "prompt_token_ids": [1, 100]}, (400, "prompt")),
    ("detokenize", {"model": "m", "tokens": [100]}, (400, "tokens")),
    ("detokenize", {"model": "m", "tokens": [False]}, (400, "tokens")),
    ("detokenize", {"model": "m", "tokens": None}, (400, "tokens")),
])
def test_bad_arguments_are_answered_at_once_naming_the_field(what, args, expected):
    door = Door()
    assert error(door.reply(door.ask(what, **args))) == expected and not door.q.pending


def test_a_principal_may_tokenize_only_for_its_models():
    door = Door()
    alice = Principal("key:a", "alice", frozenset({"other"}), 1, False)
    assert error(door.reply(door.ask(principal=alice, model="m", prompt="a"))) == (403, "model")


def test_token_ids_given_are_checked_and_answered_without_the_tokenizer():
    door = Door()
    assert door.reply(door.ask(model="m", prompt_token_ids=[1, 99]))["tokens"] == [1, 99]
    assert not door.q.pending and all(peer == "io" for peer, _ in door.sent)
