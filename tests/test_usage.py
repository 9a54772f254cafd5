"""The usage parser: token counts from the `usage` object at the end of an answer (JSON, or an
SSE stream's last events), parsed once per flow for every subscriber."""

from __future__ import annotations

import pytest

from router.backends.pool import Backend
from router.flow import Usage
from router.observe.usage import find_usage, usage_of

from .conftest import make_flow

A = Backend("http://a:8000", ("m",))


# --- usage in the end of the body -------------------------------------------------------------

CHAT_JSON = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index"'
    b':0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{'
    b'"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":'
    b'{"cached_tokens":4}},"prompt_logprobs":null,"kv_transfer_params":null}'
)


def sse(*events: str) -> bytes:
    return b"".join(f"data: {event}\n\n".encode() for event in events)


CHUNK = ('{"id":"c","object":"chat.completion.chunk",'
         '"choices":[{"index":0,"delta":{"content":"x"}}]}')
USAGE_CHUNK = ('{"id":"c","object":"chat.completion.chunk","choices":[],'
               '"usage":{"prompt_tokens":5,"total_tokens":15,"completion_tokens":10}}')


@pytest.mark.parametrize("tail, expected", [
    (CHAT_JSON, Usage(12, 7)),
    (sse(CHUNK, CHUNK, USAGE_CHUNK, "[DONE]"), Usage(5, 10)),
    # continuous usage stats: every chunk has one, the last one counts
    (sse(CHUNK[:-1] + ',"usage":{"prompt_tokens":5,"completion_tokens":1}}',
         CHUNK[:-1] + ',"usage":{"prompt_tokens":5,"completion_tokens":2}}', "[DONE]"),
     Usage(5, 2)),
    # the Responses API names them input/output tokens; earlier events have "usage": null
    (b'event: response.created\ndata: {"response":{"status":"in_progress","usage":null}}\n\n'
     b'event: response.completed\ndata: {"response":{"status":"completed","usage":'
     b'{"input_tokens":3,"input_tokens_details":{"cached_tokens":0},"output_tokens":9,'
     b'"total_tokens":12}}}\n\n', Usage(3, 9)),
    (b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}', Usage(8, None)),
    (sse(CHUNK[:-1] + ',"usage":null}', "[DONE]"), None),
    (sse(CHUNK, CHUNK, "[DONE]"), None),
    (b'{"text":"hello","usage":{"type":"duration","seconds":3}}', None),
    (b'{"usage":{"prompt_tokens":5,"completion_to', None),  # cut: no crash
    (sse('{"choices":[{"delta":{"content":"the \\"usage\\": 5"}}]}', "[DONE]"), None),
    (b'"usage": {"prompt_tokens": true, "completion_tokens": -3}', None),
    (b"", None),
    (b"\xff\xfe not utf-8 \"usage\":{\"prompt_tokens\":1}", Usage(1, None)),
])
def test_find_usage_reads_the_last_usage_object_of_the_tail(
    tail: bytes, expected: Usage | None
) -> None:
    assert find_usage(tail) == expected


def test_find_usage_in_the_last_4_kib_of_a_long_stream() -> None:
    body = sse(*[CHUNK] * 500, USAGE_CHUNK, "[DONE]")
    assert len(body) > 40_000
    assert find_usage(body[-4096:]) == Usage(5, 10)


def test_usage_of_parses_a_tail_once_for_all_subscribers() -> None:
    flow = make_flow(A, 0.0)
    flow.status = 200
    flow.tail = CHAT_JSON  # type: ignore[attr-defined]
    first = usage_of(flow)
    assert first == Usage(12, 7)
    assert usage_of(flow) is first
