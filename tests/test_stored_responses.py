"""A stored response's follow-ups reach the engine that made it: GET, DELETE, cancel and
`previous_response_id`, through the router (round robin over two engines) to fake engines that
each know only their own responses."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from router.backends.pool import backend_id
from router.backends.response_homes import Home, ResponseHomes, response_id_of
from router.keys import RESPONSE_HOMES
from router.testing import RunningEngine
from tests.conftest import CHAT, RouterUnderTest


def client_for(router: RouterUnderTest) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


async def test_follow_ups_reach_the_engine_that_stored_the_response(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    client = client_for(router)
    made = [await client.responses.create(model=CHAT, input=f"q{n}") for n in range(4)]
    # Round robin spread them: without affinity half the follow-ups would miss.
    assert all(len(engine.state.responses) == 2 for engine in engines)
    for response in made:
        again = await client.responses.retrieve(response.id)
        assert again.id == response.id and again.status == "completed"
    cancelled = await client.responses.cancel(made[0].id)
    assert cancelled.status == "cancelled"
    # A conversation goes on where its history is (twice each: round robin alone would
    # send every second one to the other engine).
    for response in (made[0], made[0], made[1], made[1]):
        follow = await client.responses.create(model=CHAT, input="and then?",
                                               previous_response_id=response.id)
        assert follow.status == "completed"
    await client.responses.delete(made[1].id)
    assert all(made[1].id not in engine.state.responses for engine in engines)
    with pytest.raises(openai.NotFoundError) as gone:
        await client.responses.retrieve(made[1].id)
    assert gone.value.body["code"] == "response_not_found"  # type: ignore[index]
    await router.settled(4 + 4 + 1 + 4 + 1 + 1)


async def test_a_streamed_response_is_found_again(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    client = client_for(router)
    ids = []
    for n in range(2):
        stream = await client.responses.create(model=CHAT, input=f"s{n}", stream=True)
        async for event in stream:
            if event.type == "response.completed":
                ids.append(event.response.id)
    assert len(ids) == 2
    for response_id in ids:
        assert (await client.responses.retrieve(response_id)).id == response_id
    await router.settled(4)


async def test_an_id_the_router_forgot_is_looked_for_on_every_engine(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    client = client_for(router)
    made = [await client.responses.create(model=CHAT, input=f"q{n}") for n in range(2)]
    homes = router.app[RESPONSE_HOMES]
    for response in made:  # as after a restart, or when made through another replica
        homes.forget(response.id)
    for response in made:  # every second one would miss without the lookup
        assert (await client.responses.retrieve(response.id)).id == response.id
    owner = next(engine for engine in engines if made[0].id in engine.state.responses)
    home = homes.home_of(made[0].id)
    assert home is not None and home.backend_id == backend_id(owner.url)  # remembered

    homes.forget(made[1].id)
    for _ in range(2):  # a conversation finds its engine too
        follow = await client.responses.create(model=CHAT, input="more",
                                               previous_response_id=made[1].id)
        assert follow.status == "completed"

    started = [engine.state.started for engine in engines]
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.responses.delete("resp-nowhere")
    assert unknown.value.body["code"] == "response_not_found"  # type: ignore[index]
    # Only the read-only question reached the engines: each was asked once, none got a DELETE.
    assert [engine.state.started for engine in engines] == [n + 1 for n in started]
    assert all(engine.state.last_path == "/v1/responses/resp-nowhere" for engine in engines)
    await router.settled(2 + 2 + 2 + 1)


async def test_the_client_can_name_the_engine(
    router: RouterUnderTest, engines: list[RunningEngine]
) -> None:
    client = client_for(router)
    made = await client.responses.create(model=CHAT, input="hi")
    owner = next(engine for engine in engines if made.id in engine.state.responses)
    async with aiohttp.ClientSession() as session:
        url = f"{router.url}/v1/responses/{made.id}?id={backend_id(owner.url)}"
        async with session.get(url) as response:
            assert response.status == 200
            assert (await response.json())["id"] == made.id
    assert owner.state.last_path == f"/v1/responses/{made.id}"  # `id` is the router's
    await router.settled(2)


def test_the_id_is_read_from_json_and_from_a_stream_head() -> None:
    assert response_id_of(b'{"id":"resp_1a","object":"response","output":[') == "resp_1a"
    stream = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
              b'"response":{"id":"resp-e-3","object":"response"')
    assert response_id_of(stream) == "resp-e-3"
    assert response_id_of(b'{"item_id":"msg_1"') is None
    assert response_id_of(b'{"error":{"message":"x"}}') is None


def test_the_map_keeps_the_most_recently_used() -> None:
    homes = ResponseHomes(capacity=2)
    homes.remember("a", Home("b1", CHAT))
    homes.remember("b", Home("b2", CHAT))
    assert homes.home_of("a") == Home("b1", CHAT)  # used: kept over "b"
    homes.remember("c", Home("b1", CHAT))
    assert homes.home_of("b") is None and len(homes) == 2
