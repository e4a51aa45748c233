"""Keep-alive values as Ollama takes them: how long a model stays loaded after its last
request. Neutral ground: the API parser and the kernel both read them."""
from __future__ import annotations

FOREVER = -1.0   # a keep-alive below zero: never unloaded for idleness
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0


def parse_keep_alive(value) -> float | None:
    """A keep-alive as Ollama takes it: seconds (a number), a duration string ("30s", "5m",
    "1h", "1h30m"), 0 (unload right after) or a negative number (never). None: unset."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration like '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration(value.strip())
    else:
        raise ValueError("keep_alive must be a number of seconds or a duration like '5m'")
    if seconds != seconds or seconds > MAX_KEEP_ALIVE_S:   # NaN, or beyond ten years
        raise ValueError(f"keep_alive {value!r} is out of range")
    return FOREVER if seconds < 0 else seconds


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    if len(text) > 32 or not text:
        raise ValueError(f"keep_alive {text[:32]!r}: use seconds or a duration like '5m'")
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    try:
        return sign * float(body)
    except ValueError:
        pass
    total, number = 0.0, ""
    i = 0
    while i < len(body):
        ch = body[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if body.startswith("ms", i) else ch
        if unit not in _UNITS or not number:
            raise ValueError(f"keep_alive {text!r}: use seconds or a duration like '5m' (units ms, s, m, h, d)")
        try:
            total += float(number) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"keep_alive {text!r}: {number!r} is not a number") from None
        number, i = "", i + len(unit)
    if number:
        raise ValueError(f"keep_alive {text!r}: a number without a unit at the end")
    return sign * total
