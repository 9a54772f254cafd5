"""`--prefix-min-match-length` (production-stack's, in characters): a cached prefix shorter
than it does not route the request; the least loaded backend serves it instead."""

from __future__ import annotations

import aiohttp
import pytest

from router.config.load import parse_config
from router.testing import RunningEngine

from .conftest import CHAT, StartRouter, config_for

PROMPT = "You are a helpful assistant. Summarise the text below.\n" * 2  # 110 characters


async def backends_serving(router_url: str, times: int) -> set[str]:
    body = {"model": CHAT, "prompt": PROMPT, "max_tokens": 2}
    served = set()
    async with aiohttp.ClientSession() as session:
        for _ in range(times):
            async with session.post(router_url + "/v1/completions", json=body) as response:
                assert response.status == 200
                await response.read()
                served.add(response.headers["x-router-backend"])
    return served


@pytest.mark.parametrize("min_length, backends", [(50, 1), (len(PROMPT) + 1, 2)])
async def test_a_prefix_routes_only_when_it_is_long_enough(
    start_router: StartRouter, engines: list[RunningEngine], min_length: int, backends: int
) -> None:
    # The share threshold at 0, so the minimum length alone decides. Above it every repeat
    # follows the cached prefix to one backend; below it the idle backends tie and each
    # request goes to one of them at random (all 24 on one: a chance of 2**-23).
    router = await start_router(config_for(
        engines, routing_logic="prefixaware", prefix_match_threshold=0.0,
        prefix_min_match_length=min_length))
    assert len(await backends_serving(router.url, 24)) == backends


def test_the_flag_takes_characters_and_defaults_to_zero() -> None:
    assert parse_config(["--demo"]).prefix_min_match_length == 0
    config = parse_config(["--demo", "--routing-logic", "prefixaware",
                           "--prefix-min-match-length", "128"])
    assert config.prefix_min_match_length == 128
