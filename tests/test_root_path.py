"""`--root-path` as production-stack (uvicorn's root_path) means it: a proxy in front strips
the prefix, so the routes answer at `/`, probes included."""

from __future__ import annotations

import aiohttp
import pytest

from router.config.load import parse_config
from router.testing import RunningEngine

from .conftest import CHAT, StartRouter, config_for


async def test_with_a_root_path_probes_and_routes_answer_at_the_root(
    start_router: StartRouter, engines: list[RunningEngine]
) -> None:
    router = await start_router(config_for(engines, root_path="/router"))
    async with aiohttp.ClientSession() as session:
        for probe in ("/health", "/ready", "/v1/models"):
            async with session.get(router.url + probe) as response:
                assert response.status == 200, probe
        body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(router.url + "/v1/chat/completions?x=1", json=body) as response:
            assert response.status == 200
        served = [engine for engine in engines if engine.state.last_path]
        assert served[0].state.last_path == "/v1/chat/completions?x=1"
        # The prefix is the proxy's: a path that still carries it is not a route here.
        async with session.get(router.url + "/router/health") as response:
            assert response.status == 404
            assert "error" in await response.json()


def test_the_root_path_flag_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config(["--demo", "--root-path", "/router/"]).root_path == "/router"
    with pytest.raises(SystemExit):
        parse_config(["--demo", "--root-path", "router"])
    assert "argument --root-path" in capsys.readouterr().err
