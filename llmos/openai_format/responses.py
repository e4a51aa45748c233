"""Kernel outputs -> OpenAI response objects and stream chunks (chat and completions,
n choices). Pure data, no I/O: the io driver and the kernel's job manager both use it.
A chat with tools (tool_choice other than "none") has its tool calls parsed from the text
here (tool_parsers.py), so streams, whole answers and batch lines get the same calls."""
from __future__ import annotations

import time

from llmos.openai_format.requests import ParsedRequest
from llmos.openai_format.tool_parsers import MAX_CALLS, ToolCall, parser_for
from llmos.protocol import OutputItem


class _Choice:
    """One choice's text, logprobs and token ids as they accumulate."""

    def __init__(self, parser=None):
        self.parser = parser             # tool calls: the stream's parser (None: no tools to parse)
        self.streamed_calls = 0          # tool calls sent as deltas so far (their indexes)
        self.parsed: tuple | None = None  # (content, calls) of the whole text, once response() ran
        self.text: list[str] = []
        self.lp: list[dict] = []
        self.ids: list[int] = []
        self.tokens = 0
        self.finish: str | None = None
        self.usage: dict | None = None   # the kernel's, with the finishing item
        self.offset = 0                  # legacy text_offset runs over the whole completion


class ResponseShaper:
    """Accumulates one request's Outputs items (n choices, told apart by "index") and shapes
    them as OpenAI objects. Call `add(item)` for every item, in order; `chunks(item)` for its
    stream chunks; the request is complete when `done`."""

    def __init__(self, req: ParsedRequest, request_id: str, prompt_tokens: int):
        self.req, self.id, self.prompt_tokens = req, request_id, prompt_tokens
        self.created = int(time.time())
        self.choices = [_Choice(self._parser()) for _ in range(req.n)]

    def _parser(self):
        req = self.req
        if not (req.chat and req.tools and req.tool_choice != "none"):
            return None
        names = {req.tool_name} if req.tool_choice == "function" else {t["function"]["name"] for t in req.tools}
        return parser_for(req.model, frozenset(names), 1 if not req.parallel_tool_calls else MAX_CALLS)

    def _choice(self, item: OutputItem) -> _Choice:
        index = item.index
        if not isinstance(index, int) or not 0 <= index < len(self.choices):
            raise ValueError(f"output for choice {index!r} of a request with n={len(self.choices)}")
        return self.choices[index]

    def add(self, item: OutputItem) -> None:
        c = self._choice(item)
        c.text.append(item.text)
        c.lp.extend(_list(item.lp))
        c.ids.extend(item.ids)
        c.tokens += item.n
        if item.finish is not None:
            c.finish = item.finish
            if isinstance(item.usage, dict):
                c.usage = item.usage

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    @property
    def finish(self) -> str | None:
        """Choice 0's finish reason (the one a single-choice request has)."""
        return self.choices[0].finish

    @property
    def usage(self) -> dict:
        """The prompt once, the completion tokens of every choice, and OpenAI's
        prompt_tokens_details.cached_tokens: the prompt tokens whose KV the prefix cache held."""
        first = next((c.usage for c in self.choices if c.usage and "prompt_tokens" in c.usage), {})
        prompt = first.get("prompt_tokens", self.prompt_tokens)
        cached = first.get("cached_tokens", 0)
        completion = sum((c.usage or {}).get("completion_tokens", c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached if isinstance(cached, int) else 0}}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}

    def _logprobs(self, c: _Choice, entries: list) -> dict | None:
        if self.req.params.logprobs is None:
            return None
        if self.req.chat:
            return {"content": entries}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(e.get("token"))
            out["token_logprobs"].append(e.get("logprob"))
            out["top_logprobs"].append({t.get("token"): t.get("logprob") for t in _list(e.get("top_logprobs"))})
            out["text_offset"].append(c.offset)
            c.offset += len(_str(e.get("token")))
        return out

    def response(self) -> dict:
        """The complete non-stream answer (after every finishing item was added)."""
        choices = []
        for index, c in enumerate(self.choices):
            choice = {"index": index, "logprobs": self._logprobs(c, c.lp), "finish_reason": c.finish}
            if self.req.return_token_ids:
                choice["token_ids"] = c.ids
            if self.req.chat:
                choice["message"] = {"role": "assistant", "content": "".join(c.text)}
                if c.parser is not None:
                    choice["message"], choice["finish_reason"] = self._tool_message(c)
            else:
                choice["text"] = "".join(c.text)
            choices.append(choice)
        obj = "chat.completion" if self.req.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage}

    def _tool_message(self, c: _Choice) -> tuple[dict, str | None]:
        """The message of a choice whose text may hold tool calls, and its finish reason."""
        if c.parsed is None:   # once: the calls' ids must not change between calls of response()
            parser = self._parser()
            events = parser.feed("".join(c.text)) + parser.finish()
            c.parsed = ("".join(e for e in events if isinstance(e, str)),
                        [e for e in events if isinstance(e, ToolCall)])
        content, calls = c.parsed
        if not calls:
            return {"role": "assistant", "content": content}, c.finish
        message = {"role": "assistant", "content": content or None, "tool_calls": [t.as_openai() for t in calls]}
        return message, _call_finish(c.finish)

    def chunks(self, item: OutputItem) -> list[dict]:
        """The stream chunks for one item (none when it carries nothing to send). With tool
        calls, OpenAI's shape: a call's first delta has its index, id and name, the next its
        arguments; a call is sent once its closing tag shows it is valid (a malformed one
        stays content, which a stream cannot take back)."""
        c = self._choice(item)
        if c.parser is None:
            one = self.chunk(item)
            return [] if one is None else [one]
        events = c.parser.feed(item.text) + (c.parser.finish() if item.finish is not None else [])
        deltas: list[dict] = []
        for e in events:
            if isinstance(e, str):
                deltas.append({"content": e})
                continue
            k, c.streamed_calls = c.streamed_calls, c.streamed_calls + 1
            deltas.append({"tool_calls": [{"index": k, "id": e.id, "type": "function",
                                           "function": {"name": e.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": e.arguments}}]})
        lp, ids = _list(item.lp), (item.ids if self.req.return_token_ids else [])
        if not deltas and (lp or ids):
            deltas.append({})
        index, out = self.choices.index(c), []
        for i, delta in enumerate(deltas):   # the item's logprobs and ids ride on its first chunk
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(c, lp) if lp and not i else None,
                      "finish_reason": None}
            if self.req.return_token_ids:
                choice["token_ids"] = ids if not i else []
            out.append(self._chunk(choice))
        if item.finish is not None:
            finish = _call_finish(str(item.finish)) if c.streamed_calls else str(item.finish)
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
            if self.req.return_token_ids:
                choice["token_ids"] = []
            out.append(self._chunk(choice))
        return out

    def role_chunks(self) -> list[dict]:
        if not self.req.chat:
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}) for i in range(len(self.choices))]

    def chunk(self, item: OutputItem) -> dict | None:
        """The stream chunk for one item; None when it carries nothing to send."""
        text, lp, finish = item.text, _list(item.lp), item.finish
        ids = item.ids if self.req.return_token_ids else []
        if not text and not lp and not ids and finish is None:
            return None   # (text held back, e.g. a possible stop string: it comes with a later item)
        c = self._choice(item)
        choice = {"index": self.choices.index(c), "logprobs": self._logprobs(c, lp) if lp else None,
                  "finish_reason": None if finish is None else str(finish)}
        if self.req.return_token_ids:
            choice["token_ids"] = ids
        if self.req.chat:
            choice["delta"] = {"content": text} if text or finish is None else {}
        else:
            choice["text"] = text
        return self._chunk(choice)

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.req.chat else "text_completion"),
                "choices": [], "usage": self.usage}

    def _chunk(self, choice: dict) -> dict:
        obj = self._head("chat.completion.chunk" if self.req.chat else "text_completion")
        obj["choices"] = [choice]
        if self.req.include_usage:
            obj["usage"] = None
        return obj


def _call_finish(finish: str | None) -> str | None:
    """A choice that called tools and stopped on its own ends with "tool_calls" (OpenAI's);
    one cut at max_tokens keeps "length"."""
    return "tool_calls" if finish == "stop" else finish


def _str(v) -> str:
    return v if isinstance(v, str) else ""


def _list(v) -> list:
    return v if isinstance(v, list) else []
