"""The floor: the least an aiohttp pass-through proxy can do (no parsing, no events, no
metrics). `python -m bench.bare_proxy --port P --upstream http://127.0.0.1:E[,http://...]`:
several upstreams take turns (round robin), like the router's default policy."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

import aiohttp
from aiohttp import web

UPSTREAMS = web.AppKey("upstreams", Iterator[str])
SESSION = web.AppKey("session", aiohttp.ClientSession)
DROP = ("Host", "Content-Length", "Transfer-Encoding", "Connection")


async def forward(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k not in DROP}
    async with request.app[SESSION].request(
        request.method, next(request.app[UPSTREAMS]) + request.path_qs,
        data=await request.read(), headers=headers,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="comma-separated base URLs")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 2**20)
    app[UPSTREAMS] = itertools.cycle(url for url in args.upstream.split(",") if url)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
        ) as app[SESSION]:
            yield

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
