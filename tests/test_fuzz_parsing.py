"""Property-based fuzz (hypothesis) of what the router parses from clients.

- JSON requests, through a real router in front of a fake engine: whatever the bytes, the
  client gets a 2xx from the engine or a 4xx OpenAI-style JSON error; never a 5xx, never a
  hang; and every request is accounted exactly once.
- The multipart peek (`MultipartScanner`), fed every chunking of valid and mutated bodies: it
  raises nothing but `BadRequest`, and finds the same fields and parts whatever the chunking.

The short runs here are part of `make test` (derandomized: the same examples every time); the
`chaos`-marked long runs (`make chaos`) try many more, randomly.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config.settings import Config, StaticBackend
from router.errors import BadRequest
from router.proxy.multipart import MAX_FIELD_SIZE, MultipartScanner
from router.testing import RunningEngine
from router.testing.chaos.clients import Kind

from .chaos import TALLY
from .conftest import CHAT, MODELS, WHISPER, StartRouter

SHORT = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=3000, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SCANNER_SHORT = settings(SHORT, max_examples=150)
SCANNER_LONG = settings(LONG, max_examples=5000)
BYTE_BY_BYTE = 4096
"""Bodies up to this size are also fed one byte at a time."""


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> None:
    """The long variants run only with `-m chaos` (tests/chaos/conftest.py deselects them
    otherwise, when it is loaded; this covers running this file alone)."""
    if "chaos" not in (request.config.option.markexpr or ""):
        pytest.skip("long fuzz: run with `make chaos` (-m chaos)")


# --- JSON requests through a router -----------------------------------------------------------

ALIAS = "alias-of-chat"
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
             "/v1/rerank", "/v1/score", "/tokenize", "/detokenize"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=16,
)
models = st.sampled_from([CHAT, WHISPER, ALIAS, "", "no-such-model"]) | json_values
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | json_values,
     "content": st.text(max_size=40) | json_values}), max_size=4) | json_values
request_objects = st.fixed_dictionaries(
    {"model": models},
    optional={
        "messages": messages,
        "prompt": st.text(max_size=40) | st.lists(st.text(max_size=10), max_size=3)
        | json_values,
        "input": st.text(max_size=40) | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-3, 40) | json_values,
        "x-session-id": st.text(max_size=10) | st.integers() | json_values,
        "cache_salt": st.text(max_size=10) | json_values,
        "stream_options": st.just({"include_usage": True}) | json_values,
        "query": st.text(max_size=20), "documents": json_values,
        "text_1": json_values, "text_2": json_values, "tokens": json_values,
    },
)


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    """`source` with a few bytes flipped, inserted, deleted, or its tail cut."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if how == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def _nested(depth: int) -> bytes:
    return (b'{"model": "' + CHAT.encode() + b'", "messages": [], "x": '
            + b"[" * depth + b"]" * depth + b"}")


json_bodies = st.one_of(
    request_objects.map(_encode),
    mutated(request_objects.map(_encode)),
    st.binary(max_size=300),
    json_values.map(_encode),
    st.integers(1, 3000).map(_nested),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
)


def _fuzz_json(session: aiohttp.ClientSession, router_url: str,
               loop: asyncio.AbstractEventLoop, sent: list[str], kinds: Counter[str],
               problems: list[str], base: settings) -> Callable[[], None]:
    """The hypothesis test, run in a worker thread; each request goes to the router on the
    test's event loop."""

    @base
    @given(body=json_bodies, endpoint=st.sampled_from(ENDPOINTS), chunked=st.booleans())
    def fuzz(body: bytes, endpoint: str, chunked: bool) -> None:
        request_id = f"fuzz-{len(sent)}"
        sent.append(request_id)
        future = asyncio.run_coroutine_threadsafe(
            _post(session, router_url + endpoint, body, request_id, chunked), loop)
        kind, status, detail = future.result(timeout=30)
        kinds[kind.value] += 1
        if kind not in (Kind.COMPLETE, Kind.ERROR) or status is None or status >= 500:
            problems.append(f"{endpoint} {body[:200]!r}: {kind.value} {status} {detail}")
            raise AssertionError(problems[-1])

    return fuzz


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, request_id: str,
                chunked: bool) -> tuple[Kind, int | None, str]:
    """POST `body` (in one piece, or chunked in 7-byte pieces); sort the answer: any 2xx
    read to its end, a 4xx with a JSON error, or a failure (5xx, plain text, no answer)."""
    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    headers = {"Content-Type": "application/json", "x-request-id": request_id}
    try:
        async with asyncio.timeout(10):
            async with session.post(url, data=pieces() if chunked else body,
                                    headers=headers) as response:
                raw = await response.read()
                status = response.status
    except TimeoutError:
        return Kind.HUNG, None, "no answer within 10 s"
    except aiohttp.ClientError as error:
        return Kind.UNCLEAR, None, repr(error)
    if status < 300:
        return Kind.COMPLETE, status, ""
    kind = Kind.ERROR if _is_json_error(raw) else Kind.UNCLEAR
    return kind, status, raw[:200].decode("utf-8", "replace")


def _is_json_error(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw)["error"]["message"], str)
    except (ValueError, KeyError, TypeError):
        return False


async def _run_json_fuzz(start_router: StartRouter, engine: RunningEngine, policy: str,
                         base: settings) -> None:
    config = Config(
        static_backends=(StaticBackend(url=engine.url, models=MODELS),),
        aliases={ALIAS: CHAT}, routing_logic=policy, max_json_body_size=256 * 1024,
        health_check_interval=0, engine_stats_interval=0, read_timeout=5.0,
    )
    router = await start_router(config)
    sent: list[str] = []
    kinds: Counter[str] = Counter()
    problems: list[str] = []
    async with aiohttp.ClientSession() as session:
        fuzz = _fuzz_json(session, router.url, asyncio.get_running_loop(), sent, kinds,
                          problems, base)
        try:
            await asyncio.to_thread(fuzz)
        finally:
            TALLY.scenarios += 1
            TALLY.requests += len(sent)
            TALLY.results.update(kinds)
            TALLY.faults["fuzzed_json_body"] += len(sent)
            TALLY.lost += len(problems)
    flows = router.log.flows
    await router.settled(len(flows), timeout=10)
    TALLY.flows += len(flows)
    assert len(flows) == len(sent)  # every request accounted, once
    assert engine.state.open == 0


@pytest.mark.parametrize("policy", ["roundrobin", "prefixaware", "session"])
async def test_any_json_body_gets_an_answer_or_a_4xx(
    start_router: StartRouter, engine: RunningEngine, policy: str
) -> None:
    await _run_json_fuzz(start_router, engine, policy, SHORT)


@pytest.mark.chaos
@pytest.mark.usefixtures("long_run")
@pytest.mark.parametrize("policy", ["roundrobin", "prefixaware", "session"])
async def test_any_json_body_gets_an_answer_or_a_4xx_long(
    start_router: StartRouter, engine: RunningEngine, policy: str
) -> None:
    await _run_json_fuzz(start_router, engine, policy, LONG)


# --- the multipart scanner --------------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
boundaries = st.text(BCHARS + " ", min_size=1, max_size=70).filter(lambda b: b[-1] != " ")
names = st.text("abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=12)
filenames = st.none() | st.text("abcdefghijklmnopqrstuvwxyz._-0123456789", min_size=1,
                                max_size=12)
# RFC 5987 charsets for `filename*=`: real, unknown, not text codecs, and codecs whose errors
# are not UnicodeDecodeError (punycode: see the regression tests at the end).
CHARSETS = ["utf-8", "iso-8859-1", "", "bogus", "idna", "utf-16", "rot13", "utf-7", "punycode"]


SentPart = tuple[str, str | None, bytes]
"""(name, filename, value) of a generated part."""


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes, list[SentPart]]:
    """(boundary, body, [(name, filename, value)]): a valid multipart/form-data body whose
    values are built to look like delimiters (CRLFs, dashes, pieces of the boundary)."""
    boundary = draw(boundaries)
    delimiter = b"\r\n--" + boundary.encode()
    tricky = st.sampled_from([b"\r\n", b"--", b"\r\n--", delimiter[:-1], delimiter[2:],
                              b"\r\n\r\n", b"\r", b"-"])
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        pieces = draw(st.lists(st.binary(max_size=40) | tricky, max_size=8))
        value = b"".join(pieces)
        if draw(st.integers(0, 20)) == 0:
            value += b"v" * (MAX_FIELD_SIZE + 1)  # too large to keep
        if (b"\r\n" + value + delimiter).find(delimiter) != len(value) + 2:
            # It holds the delimiter (or makes one with what surrounds it): not valid.
            value = value.replace(b"\r", b"").lstrip(b"-")
        parts.append((draw(names), draw(filenames), value))
    out = draw(st.sampled_from([b"", b"preamble\r\n", b"\r\n"]))
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += draw(st.sampled_from([
                f'; filename="{filename}"',
                f"; filename*={draw(st.sampled_from(CHARSETS))}''{filename}",
                f'; filename="{filename}"; filename*=utf-8\'\'{filename}',
            ]))
        extra = draw(st.sampled_from(["", "Content-Type: audio/wav\r\n",
                                      "X-Odd:   spaced \r\n"]))
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode()
                + value + b"\r\n")
    out += f"--{boundary}--".encode() + draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue"]))
    return boundary, out, parts


def scan(boundary: str, body: bytes, cuts: list[int]) -> Any:
    """What the scanner finds, fed `body` cut at `cuts`; a `BadRequest` is a result too."""
    scanner = MultipartScanner(boundary)
    edges = [0, *sorted({c % (len(body) + 1) for c in cuts}), len(body)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadContentDispositionHeader)
            warnings.simplefilter("ignore", BadContentDispositionParam)
            for start, end in zip(edges, edges[1:]):
                scanner.feed(body[start:end])
    except BadRequest as error:
        return ("BadRequest", str(error))
    return (scanner.complete, dict(scanner.fields),
            [(p.name, p.filename, p.start, p.end, p.value) for p in scanner.parts])


cuts = st.lists(st.integers(0, 10**6), max_size=12)


def _chunking_invariant(case: tuple[str, bytes, list[SentPart]],
                        chunking: list[int]) -> None:
    boundary, body, parts = case
    whole = scan(boundary, body, [])
    assert whole[0] is True, whole  # a valid body is read to its end
    found = whole[2]
    assert len(found) == len(parts)
    fields: dict[str, str] = {}
    for (name, filename, start, end, kept), (sent_name, sent_file, value) in zip(found, parts):
        assert name == sent_name
        assert body[start:end] == value
        if kept is not None:  # a small field, not a file
            assert kept == value and len(value) <= MAX_FIELD_SIZE and name != "file"
            fields.setdefault(name, value.decode("utf-8", "replace"))
        elif len(value) <= MAX_FIELD_SIZE and name != "file":
            assert filename is not None and sent_file is not None
    assert whole[1] == fields
    assert scan(boundary, body, chunking) == whole
    if len(body) <= BYTE_BY_BYTE:
        assert scan(boundary, body, list(range(len(body)))) == whole  # byte by byte
    TALLY.scanner_inputs += 1


def _mutation_invariant(case: tuple[str, bytes, Any], body: bytes, chunking: list[int]) -> None:
    boundary = case[0]
    whole = scan(boundary, body, [])  # raises anything but BadRequest: the test fails
    assert scan(boundary, body, chunking) == whole
    TALLY.scanner_inputs += 1
    TALLY.faults["mutated_multipart_body"] += 1


@SCANNER_SHORT
@given(case=multipart_bodies(), chunking=cuts)
def test_scanner_finds_the_same_parts_in_any_chunking(
    case: tuple[str, bytes, list[SentPart]], chunking: list[int]
) -> None:
    _chunking_invariant(case, chunking)


@pytest.mark.chaos
@pytest.mark.usefixtures("long_run")
@SCANNER_LONG
@given(case=multipart_bodies(), chunking=cuts)
def test_scanner_finds_the_same_parts_in_any_chunking_long(
    case: tuple[str, bytes, list[SentPart]], chunking: list[int]
) -> None:
    _chunking_invariant(case, chunking)


@st.composite
def mutated_multipart(draw: st.DrawFn) -> tuple[tuple[str, bytes, Any], bytes]:
    case = draw(multipart_bodies())
    return case, draw(mutated(st.just(case[1])))


@SCANNER_SHORT
@given(mutation=mutated_multipart(), chunking=cuts)
def test_scanner_raises_only_bad_request_on_mutated_bodies(
    mutation: tuple[tuple[str, bytes, Any], bytes], chunking: list[int]
) -> None:
    _mutation_invariant(mutation[0], mutation[1], chunking)


@pytest.mark.chaos
@pytest.mark.usefixtures("long_run")
@SCANNER_LONG
@given(mutation=mutated_multipart(), chunking=cuts)
def test_scanner_raises_only_bad_request_on_mutated_bodies_long(
    mutation: tuple[tuple[str, bytes, Any], bytes], chunking: list[int]
) -> None:
    _mutation_invariant(mutation[0], mutation[1], chunking)


# --- regressions: what the fuzz found ----------------------------------------------------------
# aiohttp's parse_content_disposition lets a UnicodeError (not a UnicodeDecodeError) out of the
# punycode codec; the scanner must turn it into a 400, not let it become a 500.

PUNYCODE_FILE = (b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
                 + WHISPER.encode() + b"\r\n--b\r\nContent-Disposition: form-data; "
                 b"name=\"file\"; filename*=punycode''ab-%23\r\n\r\nxx\r\n--b--\r\n")


def test_scanner_punycode_filename_is_a_bad_request_at_worst() -> None:
    assert scan("b", PUNYCODE_FILE, [])[0] == "BadRequest"


async def test_router_punycode_filename_is_not_a_500(
    start_router: StartRouter, engine: RunningEngine
) -> None:
    router = await start_router(Config(static_backends=(
        StaticBackend(url=engine.url, models=MODELS),)))
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/audio/transcriptions", data=PUNYCODE_FILE,
                                headers={"Content-Type": "multipart/form-data; boundary=b"}
                                ) as response:
            assert response.status < 500, await response.text()
    await router.settled(len(router.log.flows))
