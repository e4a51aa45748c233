"""The io driver's OpenAI shaping, as pure functions: n choices, stream chunks, usage."""
from llmos.openai_format import ResponseShaper, parse_chat, parse_completion
from llmos.protocol import OutputItem


def items(index, pieces, ids, finish="stop"):
    out = [OutputItem(rid="r", index=index, text=p, n=len(i), ids=i, lp=None, finish=None, usage=None)
           for p, i in zip(pieces, ids)]
    out[-1].finish = finish
    out[-1].usage = {"prompt_tokens": 5, "completion_tokens": sum(len(i) for i in ids)}
    return out


def test_token_ids_of_tokens_whose_text_is_held_back_still_stream():
    req = parse_completion({"model": "m", "prompt": "x", "stream": True, "return_token_ids": True})
    shaper = ResponseShaper(req, "r", 5)
    held, rest = items(0, ["", "ab"], [[11], [12, 13]])
    chunks = []
    for item in (held, rest):
        shaper.add(item)
        chunks.append(shaper.chunk(item))
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[11], [12, 13]]
    assert [c["choices"][0]["text"] for c in chunks] == ["", "ab"]
    plain = ResponseShaper(parse_completion({"model": "m", "prompt": "x", "stream": True}), "r", 5)
    assert plain.chunk(held) is None     # without token ids an empty item sends nothing


def test_choices_finish_independently_and_usage_adds_completions():
    req = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2})
    shaper = ResponseShaper(req, "r", 5)
    a, b = items(0, ["He", "llo"], [[1], [2]]), items(1, ["Hi"], [[3]], finish="length")
    for item in (a[0], b[0]):
        shaper.add(item)
    assert not shaper.done and shaper.choices[1].finish == "length"
    shaper.add(a[1])
    assert shaper.done
    body = shaper.response()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Hello", "stop"), (1, "Hi", "length")]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert [c["choices"][0]["index"] for c in shaper.role_chunks()] == [0, 1]
