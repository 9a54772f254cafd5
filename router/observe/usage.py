"""Token counts from the end of the answer: the `usage` object in `flow.tail` (the last bytes
of the body only; SSE chunks are never parsed one by one), parsed once per flow for every
subscriber (metrics, access log)."""

from __future__ import annotations

import json

from router.flow import RequestFlow, Usage

__all__ = ["find_usage", "usage_of"]

_USAGE_KEY = b'"usage"'
_USAGE_SPAN = 1024
"""Bytes after the key that the object must fit in (vLLM's, with details, is ~250)."""
_USAGE_TRIES = 3
"""`"usage": null` keys skipped (earlier stream events) before giving up."""
_decoder = json.JSONDecoder()


def _count(usage: dict[str, object], *keys: str) -> int | None:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def find_usage(tail: bytes) -> Usage | None:
    """The token counts of the last `"usage": {...}` object in `tail`, or None.

    `tail` is the end of a response body: a JSON answer (usage near its end), or an SSE stream
    whose last event before `[DONE]` carries usage (`stream_options.include_usage`, or
    `stream_include_usage` for transcriptions; with continuous usage every chunk has one and
    the last wins). Chat/completions name the counts `prompt_tokens`/`completion_tokens`, the
    Responses API `input_tokens`/`output_tokens`. Never raises.
    """
    end = len(tail)
    for _ in range(_USAGE_TRIES):
        at = tail.rfind(_USAGE_KEY, 0, end)
        if at < 0:
            return None
        end = at
        text = tail[at + len(_USAGE_KEY): at + len(_USAGE_KEY) + _USAGE_SPAN].decode(
            "utf-8", "replace")
        colon = text.find(":")
        if colon < 0 or text[:colon].strip():
            continue  # the word inside a string, not a key
        start = colon + 1
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        try:
            value, _ = _decoder.raw_decode(text, start)
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue  # `"usage": null` in an earlier event of the stream
        prompt = _count(value, "prompt_tokens", "input_tokens")
        completion = _count(value, "completion_tokens", "output_tokens")
        if prompt is None and completion is None:
            return None  # e.g. a transcription's {"type": "duration", "seconds": 3}
        return Usage(prompt, completion)
    return None


def usage_of(flow: RequestFlow) -> Usage | None:
    """The usage of a completed 2xx answer, from `flow.tail`; None when it has none."""
    status = flow.status
    if status is None or not 200 <= status < 300:
        return None
    if flow.parsed_usage is None:
        flow.parsed_usage = (find_usage(flow.tail) if flow.tail else None,)
    return flow.parsed_usage[0]
