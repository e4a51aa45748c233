"""Tokenizer driver: prompts and chats -> token ids; token ids -> text deltas.

It runs apart from the kernel so that tokenizing never stalls the scheduling loop.
Its per-request detokenization state is rebuildable: the kernel re-sends the token
ids a new incarnation needs (the `prior` field), so a restart loses no text.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from llmos import protocol
from llmos.drivers.runtime import DriverRuntime, base_argparser, setup_logging
from llmos.drivers.tokenizer.chat import render
from llmos.drivers.tokenizer.detok import DetokState

log = logging.getLogger("llmos.tokenizer")
FORGET_AFTER = 4096   # finished request ids remembered, to ignore tokens still in flight


class TokenizerDriver:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.states: dict[str, DetokState] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()

    def handle(self, bus, msg) -> None:
        if isinstance(msg, protocol.Encode):
            reply = self.encode(msg)
            try:
                bus.send(reply)
            except protocol.Unencodable as exc:
                bus.send(_encode_error(msg.request_id, f"the token ids cannot be sent: {exc}"))
        elif isinstance(msg, protocol.Detokenize):
            bus.send(self.detokenize(msg))
        elif isinstance(msg, protocol.Decode):
            reply = self.decode(msg)
            try:
                bus.send(reply)
            except protocol.Unencodable as exc:
                bus.send(protocol.Decoded(request_id=msg.request_id, text="", error=f"the text cannot be sent: {exc}"))
        elif msg is not None:
            log.warning("unexpected %s", type(msg).__name__)

    def encode(self, m: protocol.Encode) -> protocol.Encoded:
        """A generation request's ids with the default options; /tokenize's with its own."""
        try:
            if m.messages is not None:
                if m.add_generation_prompt and m.continue_final_message:
                    raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
                text = render(self.tok, m.messages, m.tools, m.add_generation_prompt, m.continue_final_message)
                ids = self.tok(text, add_special_tokens=bool(m.add_special_tokens))["input_ids"]
            else:
                special = True if m.add_special_tokens is None else m.add_special_tokens
                ids = self.tok(m.prompt, add_special_tokens=special)["input_ids"]
            strs = self.tok.convert_ids_to_tokens(ids) if m.return_token_strs else None
            return protocol.Encoded(request_id=m.request_id, token_ids=protocol.i32(ids), error=None, token_strs=strs)
        except Exception as exc:  # a template error is the client's problem, reported as a 400
            return _encode_error(m.request_id, f"cannot encode the prompt: {exc}")

    def decode(self, m: protocol.Decode) -> protocol.Decoded:
        """One-shot text of ids (no detokenization state: /detokenize)."""
        try:
            text = self.tok.decode(m.token_ids.tolist(), skip_special_tokens=False)
            return protocol.Decoded(request_id=m.request_id, text=text, error=None)
        except Exception as exc:  # e.g. an id this tokenizer does not know
            return protocol.Decoded(request_id=m.request_id, text="", error=f"cannot decode the tokens: {exc}"[:2000])

    def detokenize(self, m: protocol.Detokenize) -> protocol.TextDeltas:
        out = []
        for item in m.items:
            try:
                delta = self._one(item)
            except Exception:
                log.exception("bad detokenize item for %.128s (%d ids)", item.rid, len(item.ids or []))
                continue
            if delta is not None:
                out.append(delta)
        return protocol.TextDeltas(items=out)

    def _one(self, item: protocol.DetokItem) -> protocol.TextDelta | None:
        rid, finish = item.rid, item.finish
        if rid in self.finished and item.prior is None:   # late tokens of a request that ended
            return None
        state = self.states.get(rid)
        if item.prior is not None:   # a new state: also a finished request's id used again by a new one
            self.finished.pop(rid, None)
            state = self.states[rid] = DetokState(self.tok, list(item.stop or []), list(item.prior))
        elif state is None:
            # Sent to our predecessor: we lack its context. The kernel re-sends these tokens
            # with their prior once we are ready, so dropping them loses nothing.
            return None
        if finish == "abort":
            self._forget(rid)
            return None
        text, stop_hit = state.feed(list(item.ids), final=finish is not None)
        lp = self._logprobs(item.ids, item.lp) if item.lp is not None else None
        if stop_hit or finish:
            self._forget(rid)
        return protocol.TextDelta(rid=rid, text=text, n=len(item.ids), lp=lp,
                                  finish="stop" if stop_hit else finish, stop_hit=stop_hit)

    def _logprobs(self, ids: list[int], entries: list) -> list[dict]:
        """OpenAI chat-style logprob entries, one per token."""
        def tok_entry(tid, lp):
            s = self.tok.decode([int(tid)])
            return {"token": s, "logprob": float(lp), "bytes": list(s.encode("utf-8"))}
        return [{**tok_entry(tid, lp), "top_logprobs": [tok_entry(t, v) for t, v in top]}
                for tid, (lp, top) in zip(ids, entries)]

    def _forget(self, rid: str) -> None:
        self.states.pop(rid, None)
        self.finished[rid] = None
        while len(self.finished) > FORGET_AFTER:
            self.finished.popitem(last=False)


def _encode_error(request_id: str, error: str) -> protocol.Encoded:
    return protocol.Encoded(request_id=request_id, token_ids=np.zeros(0, np.int32), error=error[:2000])


def main() -> None:
    parser = base_argparser("tokenizer")
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    setup_logging(args.name)
    runtime = DriverRuntime("tokenizer", args.name, args.endpoint)
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    except Exception as exc:
        runtime.fatal(f"cannot load tokenizer from {args.model_dir}: {exc}")
    driver = TokenizerDriver(tokenizer)
    runtime.ready(protocol.TokenizerInfo(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id))
    while True:
        msg = runtime.bus.recv()
        if isinstance(msg, protocol.Shutdown):
            break
        try:   # one message that fails in any way must not stop the loop that serves every request
            driver.handle(runtime.bus, msg)
        except Exception:
            log.exception("could not handle %s", type(msg).__name__)


if __name__ == "__main__":
    main()
