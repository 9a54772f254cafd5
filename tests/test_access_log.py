"""The access line (one per request, text or JSON), the JSON log format, and no secret in any
log line (the redaction itself: tests/test_redaction.py).

Tests marked `needs_tail` need `RequestFlow.tail` (the end of the answer, for its usage): they
skip until the proxy keeps it (docs/observability.md "Integration").
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from router.backends.pool import Backend
from router.flow import Attempt, Outcome, RequestFlow
from router.keys import EVENTS, POOL
from router.observe.access_log import ACCESS_LOGGER, AccessLog, AccessRecord
from router.observe.logging_setup import configure_logging
from router.testing import RunningEngine

from .conftest import CHAT, RouterUnderTest
from .test_redaction import SECRET

CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
A = Backend("http://a:8000", ("m",))
B = Backend("http://b:8000", ("m",))

needs_tail = pytest.mark.skipif(
    "tail" not in RequestFlow.__dataclass_fields__,
    reason="needs RequestFlow.tail: the proxy keeping the end of the answer (integration)",
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    access = logging.getLogger(ACCESS_LOGGER)
    handlers, level, access_level = root.handlers[:], root.level, access.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    access.setLevel(access_level)


Configure = Callable[..., io.StringIO]


@pytest.fixture
def logs(restore_logging: None) -> Configure:
    """configure_logging(level, fmt, ...) into a StringIO, which it returns."""

    def configure(level: str = "info", fmt: str = "text", **kwargs: object) -> io.StringIO:
        stream = io.StringIO()
        configure_logging(level, fmt, stream=stream, **kwargs)  # type: ignore[arg-type]
        return stream

    return configure


class TailFlow(RequestFlow):
    """A flow that can carry `tail` before RequestFlow has the field (no __slots__ here)."""


def finished_flow(**overrides: object) -> TailFlow:
    flow = TailFlow(id="req-1", endpoint=CHAT_PATH, t_start=100.0, model="m", stream=True,
                    backend=B)
    flow.attempts.append(Attempt(A, "backend a failed", Outcome.BACKEND_ERROR))
    flow.t_headers, flow.t_first_byte, flow.t_end = 100.01, 100.0425, 101.5
    flow.status, flow.outcome, flow.bytes_down = 200, Outcome.OK, 2345
    flow.tail = (b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}'  # type: ignore[attr-defined]  # noqa: E501
                 b'\n\ndata: [DONE]\n\n')
    for name, value in overrides.items():
        setattr(flow, name, value)
    return flow


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- the access line --------------------------------------------------------------------------


def test_one_text_access_line_with_the_request_fields(logs: Configure) -> None:
    stream = logs("info", "text")
    AccessLog().on_complete(finished_flow())
    (line,) = lines(stream)
    assert " INFO router.access: " in line
    assert line.split("router.access: ", 1)[1] == (
        f"request_id=req-1 method=POST endpoint={CHAT_PATH} model=m backend={B.id} "
        "status=200 outcome=ok retries=1 ttft_ms=42.5 duration_ms=1500.0 bytes=2345 "
        "stream=true prompt_tokens=5 completion_tokens=9 error=-"
    )


def test_one_json_object_per_access_line_with_the_fields_as_keys(logs: Configure) -> None:
    stream = logs("info", "json")
    AccessLog().on_complete(finished_flow(error="backend said:\nno", status=503))
    (line,) = lines(stream)
    entry = json.loads(line)
    ts = entry.pop("ts")
    assert ts.endswith("Z") and ts[10] == "T"
    assert entry == {
        "level": "INFO", "logger": "router.access", "msg": "request",
        "request_id": "req-1", "method": "POST", "endpoint": CHAT_PATH, "model": "m",
        "backend": B.id, "status": 503, "outcome": "ok", "retries": 1, "ttft_ms": 42.5,
        "duration_ms": 1500.0, "bytes": 2345, "stream": True,
        # usage is read from 2xx answers only
        "prompt_tokens": None, "completion_tokens": None, "error": "backend said:\nno",
    }


def test_a_request_refused_before_routing_has_empty_fields(logs: Configure) -> None:
    stream = logs("info", "text")
    flow = RequestFlow(id="req-2", endpoint=CHAT_PATH, t_start=10.0)
    flow.status, flow.outcome, flow.t_end = 400, Outcome.REJECTED, 10.0002
    flow.error = 'the body is not JSON: "{oops"'
    AccessLog().on_complete(flow)
    (line,) = lines(stream)
    assert line.endswith(
        "request_id=req-2 method=POST endpoint=/v1/chat/completions model=- backend=- "
        "status=400 outcome=rejected retries=0 ttft_ms=- duration_ms=0.2 bytes=0 stream=false "
        'prompt_tokens=- completion_tokens=- error="the body is not JSON: \\"{oops\\""'
    )


def test_no_work_when_the_access_logger_is_off(
    logs: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(flow: RequestFlow) -> None:
        raise AssertionError("the access line was built")

    monkeypatch.setattr("router.observe.access_log.usage_of", boom)
    for level, fmt, access_log in (("warning", "text", True), ("info", "json", False)):
        stream = logs(level, fmt, access_log=access_log)
        AccessLog().on_complete(finished_flow())
        logging.getLogger("router.proxy").warning("still logged")
        assert len(lines(stream)) == 1 and "still logged" in stream.getvalue()


def test_json_format_covers_every_router_log_one_line_each(logs: Configure) -> None:
    stream = logs("debug", "json")
    log = logging.getLogger("router.proxy")
    log.debug("request %s: retrying on %s", "r1", "b2")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(line) for line in lines(stream))
    assert (first["level"], first["logger"], first["msg"]) == (
        "DEBUG", "router.proxy", "request r1: retrying on b2")
    assert second["msg"] == "it failed" and second["level"] == "ERROR"
    assert second["exc"].startswith("Traceback") and "ValueError: bad\nthing" in second["exc"]


def test_configure_logging_replaces_its_own_handler_and_refuses_bad_values(
    logs: Configure,
) -> None:
    first = logs("info", "text")
    second = logs("info", "json")
    logging.getLogger("router").info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "once"
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "router"]
    assert len(ours) == 1
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "yaml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", "text")


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_log_record_carries_a_secret(logs: Configure, fmt: str) -> None:
    stream = logs("debug", fmt)
    log = logging.getLogger("router.anything")
    log.info("forwarding headers %s", {"Authorization": f"Bearer {SECRET}"})
    log.warning("upstream said: %r", f"invalid api_key={SECRET}")
    log.debug(f"raw {SECRET}")
    try:
        raise RuntimeError(f"refused Authorization: Bearer {SECRET}")
    except RuntimeError:
        log.exception("call failed")
    log.info("stack", stack_info=True, extra={"x": SECRET})
    AccessLog().on_complete(finished_flow(
        id=SECRET, error=f"The model `api_key={SECRET}` does not exist."))
    output = stream.getvalue()
    assert SECRET not in output
    assert SECRET[3:] not in output
    assert output.count("[REDACTED]") >= 6
    assert len(lines(stream)) >= 6 if fmt == "json" else True


def test_the_access_line_never_holds_headers() -> None:
    flow = finished_flow()
    record = AccessRecord({"request_id": "x"})
    assert str(record) == "request_id=x"
    fields: set[str] = set()

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            assert isinstance(record.msg, AccessRecord)
            fields.update(record.msg.fields)

    logger = logging.getLogger("test.access.capture")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(Capture())
    AccessLog(logger).on_complete(flow)
    assert fields == {
        "request_id", "method", "endpoint", "model", "backend", "status", "outcome", "retries",
        "ttft_ms", "duration_ms", "bytes", "stream", "prompt_tokens", "completion_tokens",
        "error",
    }


# --- through a real router --------------------------------------------------------------------


def ensure_access_log(router: RouterUnderTest) -> None:
    """Subscribe an `AccessLog` unless make_app already does (after the integration)."""
    events = router.app[EVENTS]
    handlers = events._handlers["on_complete"]  # private, for this check only
    if not any(isinstance(getattr(handler, "__self__", None), AccessLog) for handler in handlers):
        events.subscribe(AccessLog())


async def test_one_access_line_per_request_through_the_router(
    router: RouterUnderTest, engines: list[RunningEngine], logs: Configure
) -> None:
    stream = logs("info", "json")
    ensure_access_log(router)
    headers = {"Authorization": f"Bearer {SECRET}", "x-request-id": "client-id-1",
               "x-api-key": SECRET}
    async with aiohttp.ClientSession() as session:
        streamed = {"model": CHAT, "messages": MESSAGES, "stream": True,
                    "stream_options": {"include_usage": True}}
        async with session.post(router.url + CHAT_PATH, headers=headers,
                                json=streamed) as response:
            assert response.status == 200
            body = await response.read()
        headers["x-request-id"] = "client-id-2"
        async with session.post(router.url + CHAT_PATH + f"?api_key={SECRET}", headers=headers,
                                json={"model": f"{SECRET}", "messages": MESSAGES}) as response:
            assert response.status == 404
        await router.settled(2)
    output = stream.getvalue()
    assert SECRET not in output
    access = [json.loads(line) for line in lines(stream)
              if json.loads(line)["logger"] == ACCESS_LOGGER]
    assert len(access) == 2
    ok, refused = access
    assert ok["request_id"] == "client-id-1" and refused["request_id"] == "client-id-2"
    assert (ok["status"], ok["outcome"], ok["model"], ok["retries"]) == (200, "ok", CHAT, 0)
    assert ok["backend"] in {backend.id for backend in router.app[POOL].backends}
    assert ok["bytes"] == len(body)
    assert 0 < ok["ttft_ms"] <= ok["duration_ms"]
    assert ok["stream"] is True
    assert (refused["status"], refused["outcome"], refused["backend"]) == (404, "rejected", None)
    assert "[REDACTED]" in refused["error"]


@needs_tail
async def test_the_access_line_has_the_token_counts_of_the_answer(
    router: RouterUnderTest, engines: list[RunningEngine], logs: Configure
) -> None:
    stream = logs("info", "json")
    ensure_access_log(router)
    async with aiohttp.ClientSession() as session:
        body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 5}
        async with session.post(router.url + CHAT_PATH, json=body) as response:
            usage = (await response.json())["usage"]
        await router.settled(1)
    (entry,) = [json.loads(line) for line in lines(stream) if ACCESS_LOGGER in line]
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])


@pytest.mark.slow
def test_cost_of_the_access_line(logs: Configure, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a pass/fail check: µs of CPU per access line, on and off, text and JSON, and a plain
    `log.info("request %s done", id)` through the same handler as the yardstick."""
    n = 20_000
    flows = [finished_flow(id=f"req-{i}") for i in range(n)]
    results = {}
    for label, level, fmt in (("text", "info", "text"), ("json", "info", "json"),
                              ("off", "warning", "text")):
        logs(level, fmt)
        subscriber = AccessLog()
        started = time.process_time()
        for flow in flows:
            subscriber.on_complete(flow)
        results[label] = (time.process_time() - started) / n * 1e6
    logs("info", "text")
    log = logging.getLogger("router.yardstick")
    started = time.process_time()
    for flow in flows:
        log.info("request %s done", flow.id)
    results["plain log.info"] = (time.process_time() - started) / n * 1e6
    with capsys.disabled():
        print("\naccess line: " + ", ".join(f"{k} {v:.1f} µs" for k, v in results.items()))
