"""Bounded reads of upstream answers, and JSON parsed in steps, against loopback servers."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from router.errors import AnswerTooLarge
from router.proxy.upstream_read import loads_stepwise, read_bounded
from router.testing.flood import FILLER, start_flood

MIB = 1024 * 1024


async def test_read_bounded_returns_an_answer_within_the_limit() -> None:
    async with await start_flood(["/a"], total=3 * MIB + 5) as flood, \
            aiohttp.ClientSession() as session:
        async with session.get(flood.url + "/a") as response:
            body = await read_bounded(response, 4 * MIB)
        assert len(body) == 3 * MIB + 5 and body.startswith(FILLER)


@pytest.mark.parametrize("declare_length", [False, True])
async def test_read_bounded_cuts_an_endless_answer_at_the_limit(declare_length: bool) -> None:
    total = 64 * MIB if declare_length else None
    async with await start_flood(["/a"], total=total, declare_length=declare_length) as flood, \
            aiohttp.ClientSession() as session:
        async with session.get(flood.url + "/a") as response:
            with pytest.raises(AnswerTooLarge) as raised:
                await read_bounded(response, 2 * MIB, "the test server")
        assert raised.value.message == "the test server answered more than 2097152 bytes"
        assert (raised.value.status, raised.value.code) == (502, "upstream_answer_too_large")
        async with asyncio.timeout(2):
            await flood.state.cut_event.wait()
        assert flood.state.bytes_sent < 8 * MIB


JSON_CASES = [
    "{}", " { } ", '{"a": []}', '{"a" : [ 1 , 2 ] , "b" : {"c": [1]} }', '[1, 2]', "3", '"x"',
    '{"a": [{"x": 1}, [2], "s"], "a": 2}', '{"a": [ ], "b": null}', '\n{"a":\t[true]}\r\n',
]
BAD_JSON = [
    "", "{", '{"a"}', '{"a": [1,]}', '{"a": 1,}', '{"a": 1} x', "{1: 2}", '{"a": [1 2]}',
    '{"a": [', '{"a" 1}', "[1,]",
]


async def test_loads_stepwise_agrees_with_json_loads() -> None:
    for text in JSON_CASES:
        assert await loads_stepwise(text.encode()) == json.loads(text), text
    for text in BAD_JSON:
        with pytest.raises(ValueError):
            await loads_stepwise(text.encode())
    with pytest.raises(RecursionError):
        await loads_stepwise(b'{"a": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}")


async def test_loads_stepwise_of_a_big_answer_lets_the_loop_run() -> None:
    rng = random.Random(1)
    answer = json.dumps({"object": "list", "data": [
        {"index": i, "embedding": [rng.random() for _ in range(1024)]} for i in range(800)
    ]}).encode()
    gaps: list[float] = []

    async def ticker() -> None:
        while True:
            began = time.monotonic()
            await asyncio.sleep(0)
            gaps.append(time.monotonic() - began)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    parsed = await loads_stepwise(answer)
    task.cancel()
    assert parsed == json.loads(answer)
    print(f"\n{len(answer) / MIB:.1f} MiB parsed in steps: {len(gaps)} yields, "
          f"longest hold of the loop {max(gaps) * 1e3:.1f} ms")
    assert len(gaps) > 10 and max(gaps) < 0.1
