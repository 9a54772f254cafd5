"""The Batch and Files APIs through a real router and real fake engines, with the `openai` SDK
as the client: files in and out, batches run, cancelled and resumed after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types import Batch

from router.batch import Batches
from router.batch.records import HashSet
from router.config.load import load_config
from router.config.settings import Config, ConfigError, StaticBackend
from router.flow import Outcome
from router.keys import BATCHES, EVENTS
from router.testing import RunningEngine
from router.testing.chaos.backend import Fault, MisbehavingBackend

from .conftest import CHAT, RouterUnderTest, StartRouter, config_for
from .test_multipart import BOUNDARY, content_type

FINISHED = ("completed", "failed", "cancelled", "expired")


def line(number: int, model: str = CHAT, **body: Any) -> dict[str, Any]:
    """Input line `number`: its answer has `1 + number % 7` tokens, to match it by custom_id."""
    return {
        "custom_id": f"request-{number}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 1 + number % 7,
                 "messages": [{"role": "user", "content": f"line {number}"}], **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def number_of(flow_json: dict[str, Any] | None) -> int:
    """The input line a routed flow carried."""
    assert flow_json is not None
    return int(flow_json["messages"][0]["content"].removeprefix("line "))


@pytest.fixture
def start_batch_router(
    start_router: StartRouter, engines: list[RunningEngine], tmp_path: Path
) -> Callable[..., Any]:
    async def start(**overrides: Any) -> RouterUnderTest:
        settings = {"enable_batch_api": True, "file_storage_path": str(tmp_path / "files"),
                    **overrides}
        return await start_router(config_for(engines, **settings))

    return start


@pytest.fixture
async def router(start_batch_router: Callable[..., Any]) -> RouterUnderTest:
    started: RouterUnderTest = await start_batch_router()
    return started


def sdk(router: RouterUnderTest) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
async def client(router: RouterUnderTest) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(router) as client:
        yield client


async def submit(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> Batch:
    uploaded = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    batch = await client.batches.create(input_file_id=uploaded.id, completion_window="24h",
                                        endpoint="/v1/chat/completions")
    assert batch.status == "validating" and batch.input_file_id == uploaded.id
    return batch


async def wait_for(client: openai.AsyncOpenAI, batch_id: str,
                   done: Callable[[Batch], bool], timeout: float = 30.0) -> Batch:
    async with asyncio.timeout(timeout):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if done(batch):
                return batch
            await asyncio.sleep(0.05)


def finished(batch: Batch) -> bool:
    return batch.status in FINISHED


async def records(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A result file's records by custom_id (checking each custom_id is there once)."""
    if file_id is None:
        return {}
    content = await client.files.content(file_id)
    lines = [json.loads(raw) for raw in content.text.splitlines()]
    by_id = {record["custom_id"]: record for record in lines}
    assert len(by_id) == len(lines), "a custom_id is in the results twice"
    return by_id


def assert_answers(output: dict[str, dict[str, Any]], numbers: Collection[int]) -> None:
    assert sorted(output) == sorted(f"request-{n}" for n in numbers)
    for number in numbers:
        record = output[f"request-{number}"]
        assert record["id"].startswith("batch_req_") and record["error"] is None
        response = record["response"]
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["usage"]["completion_tokens"] == 1 + number % 7


async def test_a_batch_of_1000_lines_answers_every_custom_id(
    router: RouterUnderTest, client: openai.AsyncOpenAI, engines: list[RunningEngine]
) -> None:
    batch = await submit(client, [line(n) for n in range(1000)])
    done = await wait_for(client, batch.id, finished)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 1000, "completed": 1000, "failed": 0}
    assert done.error_file_id is None and done.output_file_id is not None
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert_answers(await records(client, done.output_file_id), range(1000))
    output = await client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
    # Through the router's routing: both engines served, every line one flow, all accounted.
    served = [engine.state.completed for engine in engines]
    assert sum(served) == 1000 and min(served) > 0
    await router.settled(1000)
    assert set(router.log.outcomes()) == {Outcome.OK}
    assert sorted(number_of(flow.request_json) for flow in router.log.flows.values()) == \
        list(range(1000))
    listed = await client.batches.list()
    assert [item.id for item in listed.data] == [batch.id]


async def test_failed_lines_go_to_the_error_file_and_the_others_to_the_output(
    router: RouterUnderTest, client: openai.AsyncOpenAI
) -> None:
    lines = [line(0), line(1, model="no-such-model"), line(2, messages="not a list"), line(3)]
    done = await wait_for(client, (await submit(client, lines)).id, finished)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert done.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    assert_answers(await records(client, done.output_file_id), [0, 3])
    errors = await records(client, done.error_file_id)
    assert sorted(errors) == ["request-1", "request-2"]
    unknown = errors["request-1"]  # refused by the router: no response, an error
    assert unknown["response"] is None and unknown["error"]["code"] == "model_not_found"
    refused = errors["request-2"]  # answered by the engine with a 400
    assert refused["error"] is None and refused["response"]["status_code"] == 400
    assert "messages" in refused["response"]["body"]["error"]["message"]
    await router.settled(4)
    with pytest.raises(openai.ConflictError):  # finished: nothing left to cancel
        await client.batches.cancel(done.id)


async def test_a_line_an_engine_fails_is_retried_on_the_other_engine(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    engines[0].behaviour.fail_status = 503
    # Half of the 8 lines in flight fail at once: a budget this size lets all of them retry.
    router: RouterUnderTest = await start_batch_router(retry_budget_percent=100)
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, [line(n) for n in range(10)])).id,
                              finished)
        assert_answers(await records(client, done.output_file_id), range(10))
    assert done.error_file_id is None and engines[1].state.completed == 10
    await router.settled(10)
    assert any(flow.attempts for flow in router.log.flows.values())


async def test_a_line_answered_503_moves_to_the_other_engine_with_one_retry_event(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    engines[0].behaviour.fail_status = 503
    router: RouterUnderTest = await start_batch_router(batch_concurrency=1)
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, [line(n) for n in range(4)])).id,
                              finished)
        assert_answers(await records(client, done.output_file_id), range(4))
    await router.settled(4)
    retried = [flow for flow in router.log.flows.values() if flow.attempts]
    assert retried and len(retried) == engines[0].state.failures_injected
    for flow in router.log.flows.values():
        assert flow.backend is not None and flow.backend.url == engines[1].url
        assert (flow.outcome, flow.status) == (Outcome.OK, 200)
        expected = ["new", "retry", "response", "complete"] if flow.attempts else \
            ["new", "response", "complete"]
        assert router.log.events[flow.id] == expected
    for flow in retried:
        [attempt] = flow.attempts
        assert attempt.backend.url == engines[0].url and attempt.outcome is Outcome.BACKEND_ERROR
        assert attempt.error.endswith("answered 503")


async def test_a_line_whose_backend_breaks_mid_answer_is_an_error_line_not_a_hang(
    start_router: StartRouter, tmp_path: Path
) -> None:
    async with MisbehavingBackend([Fault.SHORT_BODY, Fault.STALL_MID_BODY]) as backend:
        router = await start_router(Config(
            static_backends=(StaticBackend(backend.url, (CHAT,)),), read_timeout=0.5,
            enable_batch_api=True, file_storage_path=str(tmp_path / "files"),
            batch_concurrency=1,  # one line at a time: line 0 meets the first fault
        ))
        async with sdk(router) as client:
            done = await wait_for(client, (await submit(client, [line(0), line(1)])).id,
                                  finished, timeout=10)
            errors = await records(client, done.error_file_id)
        assert done.status == "completed" and done.output_file_id is None
        assert {custom_id: (record["response"], record["error"]["code"])
                for custom_id, record in errors.items()} == {
            "request-0": (None, "bad_gateway"), "request-1": (None, "gateway_timeout")}
        assert [served.fault for served in backend.served] == [Fault.SHORT_BODY,
                                                               Fault.STALL_MID_BODY]
        await router.settled(2)
    by_line = {number_of(flow.request_json): flow for flow in router.log.flows.values()}
    assert (by_line[0].outcome, by_line[0].status) == (Outcome.BACKEND_ERROR, 502)
    assert (by_line[1].outcome, by_line[1].status) == (Outcome.TIMEOUT, 504)
    assert all(router.log.events[flow.id] == ["new", "response", "complete"]
               for flow in by_line.values())


async def test_a_line_answered_past_the_batch_answer_limit_is_an_error_line(
    start_batch_router: Callable[..., Any]
) -> None:
    # A chat answer is some 360 bytes.
    router: RouterUnderTest = await start_batch_router(batch_max_answer_size=250)
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, [line(0)])).id, finished)
        errors = await records(client, done.error_file_id)
    assert errors["request-0"]["response"] is None
    assert errors["request-0"]["error"]["code"] == "upstream_answer_too_large"
    assert errors["request-0"]["error"]["message"].endswith("answered more than 250 bytes")
    await router.settled(1)  # the backend's connection was closed, not left in the pool
    assert router.log.only().outcome is Outcome.BACKEND_ERROR


async def test_a_line_goes_upstream_with_a_client_requests_headers_and_no_encoding_added(
    router: RouterUnderTest, client: openai.AsyncOpenAI, engines: list[RunningEngine]
) -> None:
    await wait_for(client, (await submit(client, [line(0)])).id, finished)
    await router.settled(1)
    [sent] = [engine.state.last_headers for engine in engines if engine.state.last_headers]
    assert sent["x-request-id"] == router.log.only().id
    assert sent["Content-Type"] == "application/json"
    # The router's session passes bytes through undecoded: no Accept-Encoding of aiohttp's.
    assert "Accept-Encoding" not in sent and "User-Agent" not in sent


class InFlight:
    """Subscriber: the most flows running at once."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def on_new(self, flow: object) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def on_complete(self, flow: object) -> None:
        self.now -= 1


async def test_lines_wait_for_the_routers_concurrency_cap_instead_of_failing(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.first_token_delay = 0.005
    router: RouterUnderTest = await start_batch_router(max_concurrent_requests=2, queue_size=1,
                                                       batch_concurrency=8)
    in_flight = InFlight()
    router.app[EVENTS].subscribe(in_flight)
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, [line(n) for n in range(40)])).id,
                              finished)
        assert_answers(await records(client, done.output_file_id), range(40))
    assert done.error_file_id is None and in_flight.most == 2


async def test_invalid_input_lines_fail_the_batch_naming_their_line(
    client: openai.AsyncOpenAI, engines: list[RunningEngine]
) -> None:
    lines = [line(0), line(1), {**line(2), "url": "/v1/embeddings"}, line(1)]
    done = await wait_for(client, (await submit(client, lines)).id, finished)
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and done.errors.data is not None
    assert [(e.line, e.param) for e in done.errors.data] == [(3, "url"), (4, "custom_id")]
    assert sum(engine.state.started for engine in engines) == 0


async def test_cancel_midway_leaves_the_batch_cancelled_with_partial_counts(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    router: RouterUnderTest = await start_batch_router(batch_concurrency=4)
    for engine in engines:
        engine.behaviour.first_token_delay = 0.02
    async with sdk(router) as client:
        batch = await submit(client, [line(n) for n in range(300)])
        await wait_for(client, batch.id, lambda b: bool(b.request_counts
                                                        and b.request_counts.completed >= 20))
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        done = await wait_for(client, batch.id, finished)
        assert done.status == "cancelled" and done.cancelled_at
        assert done.request_counts is not None
        completed = done.request_counts.completed
        assert 20 <= completed < 300 and done.request_counts.failed == 0
        assert_answers(await records(client, done.output_file_id),
                       [number_of(flow.request_json) for flow in router.log.flows.values()
                        if flow.outcome is Outcome.OK])
    await asyncio.sleep(0.05)
    router.log.assert_balanced()
    assert router.in_flight() == 0
    assert {flow.outcome for flow in router.log.flows.values()} <= {Outcome.OK, Outcome.CANCELLED}


async def test_lines_left_when_the_window_expires_fail_as_batch_expired(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    for engine in engines:
        engine.behaviour.first_token_delay = 0.1
    router: RouterUnderTest = await start_batch_router(batch_concurrency=1)
    async with sdk(router) as client:
        batch = await submit(client, [line(n) for n in range(6)])
        router.app[BATCHES].get(batch.id, None).expires_at = 0  # as if its 24 hours had passed
        done = await wait_for(client, batch.id, finished)
        assert done.status == "expired" and done.expired_at
        assert done.request_counts is not None
        assert done.request_counts.completed <= 2 and done.request_counts.failed >= 4
        errors = await records(client, done.error_file_id)
    assert {record["error"]["code"] for record in errors.values()} == {"batch_expired"}


async def test_a_restart_midway_completes_the_batch_without_running_a_line_twice(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    total = 400
    for engine in engines:
        engine.behaviour.first_token_delay = 0.02
    first: RouterUnderTest = await start_batch_router()
    async with sdk(first) as client:
        batch = await submit(client, [line(n) for n in range(total)])
        await wait_for(client, batch.id, lambda b: bool(b.request_counts
                                                        and b.request_counts.completed >= 100))
    await first.server.close()  # the router stops: its runner stops with lines in flight
    stopped = first.app[BATCHES].get(batch.id, None)
    assert stopped.status == "in_progress" and 100 <= stopped.completed < total
    finished_before = {number_of(flow.request_json) for flow in first.log.flows.values()
                       if flow.outcome is Outcome.OK}
    assert len(finished_before) == stopped.completed  # each finished line is in the output

    second: RouterUnderTest = await start_batch_router()  # over the same storage
    async with sdk(second) as client:
        done = await wait_for(client, batch.id, finished)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert done.request_counts.model_dump() == {"total": total, "completed": total,
                                                    "failed": 0}
        assert_answers(await records(client, done.output_file_id), range(total))
    await second.settled(total - len(finished_before))
    ran_after = [number_of(flow.request_json) for flow in second.log.flows.values()]
    assert sorted(ran_after) == sorted(set(range(total)) - finished_before)


async def test_a_50_mb_upload_is_written_in_chunks_never_held_whole(
    router: RouterUnderTest, client: openai.AsyncOpenAI
) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB, sent 50 times
    count = 50
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"batch\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\n\r\n").encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(count):
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        async with aiohttp.ClientSession() as session:
            async with session.post(router.url + "/v1/files", data=body(),
                                    headers={"Content-Type": content_type()}) as response:
                assert response.status == 200, await response.text()
                uploaded = await response.json()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert uploaded["bytes"] == count * len(block)
    assert peak < 8 * 2**20, f"the upload held {peak / 2**20:.1f} MiB at its peak"
    digest = hashlib.sha256()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{router.url}/v1/files/{uploaded['id']}/content") as response:
            async for chunk in response.content.iter_chunked(2**20):
                digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(block * count).hexdigest()


async def test_files_are_listed_retrieved_and_deleted(client: openai.AsyncOpenAI) -> None:
    first = await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    second = await client.files.create(file=("b.txt", b"hello"), purpose="user_data")
    listed = await client.files.list()
    assert [item.id for item in listed.data] == [second.id, first.id]  # newest first
    assert [f.id for f in (await client.files.list(purpose="batch")).data] == [first.id]
    assert (await client.files.retrieve(second.id)).filename == "b.txt"
    assert (await client.files.content(second.id)).content == b"hello"
    deleted = await client.files.delete(first.id)
    assert deleted.deleted and deleted.id == first.id
    for missing in (first.id, "file-nope", "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(missing)
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_0123456789abcdef01234567")


async def test_an_upload_is_refused_past_the_size_limit_or_without_a_purpose(
    start_batch_router: Callable[..., Any], tmp_path: Path
) -> None:
    router: RouterUnderTest = await start_batch_router(max_body_size=1000)
    async with sdk(router) as client:
        with pytest.raises(openai.APIStatusError) as too_big:
            await client.files.create(file=("big.jsonl", b"x" * 2000), purpose="batch")
        assert too_big.value.status_code == 413
        with pytest.raises(openai.BadRequestError):
            await client.files.create(file=("a.jsonl", b"{}"), purpose="nonsense")  # type: ignore
        assert (await client.files.list()).data == []
    leftovers = [p.name for p in (tmp_path / "files" / "files").iterdir()]
    assert leftovers == []


def upload_body(content: bytes, purpose: bytes = b"batch") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n".encode()
            + purpose + f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"in.jsonl\"\r\n\r\n".encode() + content
            + f"\r\n--{BOUNDARY}--\r\n".encode())


async def post_upload(router: RouterUnderTest, body: bytes,
                      encoding: str | None = "gzip") -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": content_type()}
    if encoding:
        headers["Content-Encoding"] = encoding
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/files", data=body,
                                headers=headers) as response:
            return response.status, await response.json()


async def test_a_gzip_upload_is_stored_decoded_and_counted_decoded(
    start_batch_router: Callable[..., Any], tmp_path: Path
) -> None:
    router: RouterUnderTest = await start_batch_router(max_body_size=1024 * 1024,
                                                       max_inflate_ratio=0)
    content = jsonl([line(n) for n in range(1000)])  # ~190 KB
    status, item = await post_upload(router, gzip.compress(upload_body(content)))
    assert status == 200, item
    assert item["bytes"] == len(content)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{router.url}/v1/files/{item['id']}/content") as response:
            assert await response.read() == content
    # 2 MiB decoded, 2 KB sent: over the 1 MiB limit all the same.
    status, error = await post_upload(router, gzip.compress(upload_body(b"x" * 2**21)))
    assert (status, error["error"]["code"]) == (413, "payload_too_large")
    stored = sorted(p.name for p in (tmp_path / "files" / "files").iterdir())
    assert stored == sorted([item["id"], item["id"] + ".json"])


async def test_a_gzip_bomb_upload_is_refused_and_stores_nothing(
    router: RouterUnderTest, tmp_path: Path
) -> None:
    # 200 MiB in 200 KB (gzip members one after the other), under the 2 GiB size limit:
    # refused for its inflation ratio once the first MiB is past.
    member = gzip.compress(b"\0" * 2**20, 9)
    head, _, tail = upload_body(b"|").partition(b"|")
    body = gzip.compress(head) + member * 200 + gzip.compress(tail)
    status, error = await post_upload(router, body)
    assert (status, error["error"]["code"]) == (413, "payload_too_large"), error
    assert "inflates" in error["error"]["message"]
    assert [p.name for p in (tmp_path / "files" / "files").iterdir()] == []


async def test_bad_uploads_get_a_json_400_and_one_log_line(
    router: RouterUnderTest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    long_header = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                   f"filename=\"a.jsonl\"\r\nX-Padding: {'p' * 20_000}\r\n\r\n{{}}\r\n"
                   f"--{BOUNDARY}--\r\n").encode()
    for body, encoding, message in [
        (long_header, None, "part header line is too long"),
        (b"\x1f\x8b\x08\x00not gzip at all", "gzip", "Content-Encoding"),
    ]:
        caplog.clear()
        status, error = await post_upload(router, body, encoding)
        assert (status, error["error"]["type"]) == (400, "invalid_request_error"), error
        assert message in error["error"]["message"]
        await asyncio.sleep(0.1)
        assert [r.name for r in caplog.records if r.name.startswith("router")] == [
            "router.batch"]
        assert not any(r.exc_info for r in caplog.records)
    assert [p.name for p in (tmp_path / "files" / "files").iterdir()] == []


async def test_a_second_router_cannot_take_the_same_storage(
    router: RouterUnderTest, tmp_path: Path
) -> None:
    other = Batches(router.app, str(tmp_path / "files"), 1)
    with pytest.raises(OSError, match="in use by another router"):
        await other.start()


def test_batch_flags_build_the_config(tmp_path: Path) -> None:
    config = load_config(["--demo", "--enable-batch-api", "--file-storage-path", str(tmp_path),
                          "--batch-concurrency", "3"])
    assert (config.enable_batch_api, config.file_storage_path, config.batch_concurrency) == \
        (True, str(tmp_path), 3)
    defaults = load_config(["--demo"])
    assert defaults.batch_concurrency == 8
    assert (defaults.max_batch_requests, defaults.max_batch_input_size,
            defaults.file_storage_quota_per_key, defaults.file_storage_quota) == \
        (50_000, 200 * 2**20, 100 * 2**30, 0)
    limits = load_config(["--demo", "--max-batch-requests", "10", "--max-batch-input-size", "1MiB",
                          "--file-storage-quota-per-key", "2GiB", "--file-storage-quota", "1TiB"])
    assert (limits.max_batch_requests, limits.max_batch_input_size,
            limits.file_storage_quota_per_key, limits.file_storage_quota) == \
        (10, 2**20, 2 * 2**30, 2**40)


@pytest.mark.parametrize("argv, flag", [
    (["--static-backends", "http://a:8000", "--static-models", "m", "--workers", "2",
      "--enable-batch-api"], "--enable-batch-api"),
    (["--demo", "--enable-batch-api", "--file-storage-path", "{file}"], "--file-storage-path"),
    (["--demo", "--batch-concurrency", "0"], "--batch-concurrency"),
    (["--demo", "--max-batch-requests", "0"], "--max-batch-requests"),
    (["--demo", "--file-storage-quota-per-key", "0"], "--file-storage-quota-per-key"),
])
def test_bad_batch_flags_are_refused_naming_them(
    argv: list[str], flag: str, tmp_path: Path
) -> None:
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"^argument {flag}"):
        load_config([arg.replace("{file}", str(a_file)) for arg in argv])


# The same doors as requests: rate limits, body sizes, input caps, owners and quotas.

def key_sdk(router: RouterUnderTest, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0)


async def settle_batch(router: RouterUnderTest, batch_id: str, timeout: float = 30.0) -> str:
    """The batch's final status, watched inside the router (polling through the API would
    spend the rate limit the batch is paced by)."""
    batches = router.app[BATCHES]
    async with asyncio.timeout(timeout):
        while (status := batches.get(batch_id, None).status) not in FINISHED:
            await asyncio.sleep(0.02)
    return status


async def test_a_batch_spends_its_creators_rate_limit_its_lines_paced_not_failed(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    rate = 20.0  # a token every 50 ms, bursts of one
    router: RouterUnderTest = await start_batch_router(rate_limit=rate, rate_limit_burst=1.0)
    async with sdk(router) as client:
        uploaded = await client.files.create(file=("in.jsonl", jsonl([line(n) for n in range(10)])),
                                             purpose="batch")
        await asyncio.sleep(1 / rate)
        batch = await client.batches.create(input_file_id=uploaded.id, completion_window="24h",
                                            endpoint="/v1/chat/completions")
        assert await settle_batch(router, batch.id) == "completed"
        # Its client's own requests meet the bucket the batch spent.
        with pytest.raises(openai.RateLimitError):
            await client.batches.retrieve(batch.id)
    arrivals = sorted(t for engine in engines for t in engine.state.arrivals)
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    print(f"\n10 lines at {rate:g}/s: engines saw them over {arrivals[-1] - arrivals[0]:.3f} s, "
          f"gaps {min(gaps) * 1000:.0f}-{max(gaps) * 1000:.0f} ms")
    assert len(arrivals) == 10
    assert arrivals[-1] - arrivals[0] >= 9 / rate * 0.9
    assert min(gaps) >= 0.6 / rate  # paced one by one, not 8 at once
    assert router.app[BATCHES].get(batch.id, None).completed == 10


async def test_files_batches_and_models_spend_the_rate_limit_and_get_429(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    router: RouterUnderTest = await start_batch_router(rate_limit=0.5, rate_limit_burst=1.0)
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/v1/models") as response:
            assert response.status == 200  # the one token of the burst
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", b"{}\n", filename="a.jsonl")
        calls: list[tuple[str, str, Any]] = [
            ("GET", "/v1/models", None), ("GET", "/v1/files", None),
            ("POST", "/v1/files", form), ("GET", "/v1/files/file-abc", None),
            ("GET", "/v1/files/file-abc/content", None), ("DELETE", "/v1/files/file-abc", None),
            ("POST", "/v1/batches", None), ("GET", "/v1/batches", None),
            ("GET", "/v1/batches/batch_0123456789abcdef01234567", None),
            ("POST", "/v1/batches/batch_0123456789abcdef01234567/cancel", None),
        ]
        for method, path, data in calls:
            async with session.request(method, router.url + path, data=data) as response:
                assert response.status == 429, (method, path)
                assert int(response.headers["Retry-After"]) >= 1
                assert response.headers["x-request-id"]
                error = (await response.json())["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error",
                                                          "rate_limit_exceeded")
    assert router.app[BATCHES].files.list("")[0] == []
    assert sum(engine.state.started for engine in engines) == 0


async def test_a_batch_line_over_the_json_body_limit_fails_413_and_never_reaches_an_engine(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine]
) -> None:
    router: RouterUnderTest = await start_batch_router(max_json_body_size=2048)
    big = line(1)
    big["body"]["messages"][0]["content"] += " " + "x" * 100_000
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, [line(0), big, line(2)])).id,
                              finished)
        assert done.status == "completed"
        assert_answers(await records(client, done.output_file_id), [0, 2])
        errors = await records(client, done.error_file_id)
    assert list(errors) == ["request-1"] and errors["request-1"]["response"] is None
    message = "the JSON body is over the limit of 2048 bytes"
    assert errors["request-1"]["error"] == {"code": "payload_too_large", "message": message}
    # What a client sending that body itself gets.
    async with aiohttp.ClientSession() as session:
        async with session.post(router.url + "/v1/chat/completions",
                                json=big["body"]) as response:
            assert response.status == 413
            assert (await response.json())["error"]["message"] == message
    assert sum(engine.state.started for engine in engines) == 2
    assert all(number_of(engine.state.last_json) != 1 for engine in engines
               if engine.state.last_json)
    await router.settled(4)  # the line refused is counted like the client's request
    refused = [flow for flow in router.log.flows.values() if flow.status == 413]
    assert [flow.outcome for flow in refused] == [Outcome.REJECTED] * 2


@pytest.mark.parametrize("settings, code", [
    ({"max_batch_requests": 3}, "input_too_many_requests"),
    ({"max_batch_input_size": 500}, "input_too_large"),
])
async def test_a_batch_past_the_input_caps_fails_validating_and_runs_nothing(
    start_batch_router: Callable[..., Any], engines: list[RunningEngine],
    settings: dict[str, int], code: str
) -> None:
    router: RouterUnderTest = await start_batch_router(**settings)
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, [line(n) for n in range(4)])).id,
                              finished)
    assert done.status == "failed" and done.errors is not None and done.errors.data
    assert [error.code for error in done.errors.data] == [code]
    assert sum(engine.state.started for engine in engines) == 0


async def test_a_batch_at_the_input_caps_runs(
    start_batch_router: Callable[..., Any]
) -> None:
    lines = [line(n) for n in range(3)]
    router: RouterUnderTest = await start_batch_router(
        max_batch_requests=3, max_batch_input_size=len(jsonl(lines)))
    async with sdk(router) as client:
        done = await wait_for(client, (await submit(client, lines)).id, finished)
    assert done.status == "completed", done.errors


async def test_files_and_batches_belong_to_the_key_that_made_them_others_get_404(
    start_batch_router: Callable[..., Any], tmp_path: Path
) -> None:
    router: RouterUnderTest = await start_batch_router(api_keys=("key-alice", "key-bob"))
    async with key_sdk(router, "key-alice") as alice, key_sdk(router, "key-bob") as bob:
        batch = await submit(alice, [line(0)])
        done = await wait_for(alice, batch.id, finished)
        assert done.status == "completed" and done.output_file_id
        own = await alice.files.create(file=("b.txt", b"hello"), purpose="user_data")
        alices = [batch.input_file_id, done.output_file_id, own.id]
        assert {f.id for f in (await alice.files.list()).data} == set(alices)
        assert [b.id for b in (await alice.batches.list()).data] == [batch.id]

        mine = await bob.files.create(file=("in.jsonl", jsonl([line(1)])), purpose="batch")
        assert [f.id for f in (await bob.files.list()).data] == [mine.id]
        assert (await bob.batches.list()).data == []
        for file_id in alices:
            with pytest.raises(openai.NotFoundError):
                await bob.files.retrieve(file_id)
            with pytest.raises(openai.NotFoundError):
                await bob.files.content(file_id)
            with pytest.raises(openai.NotFoundError):
                await bob.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.create(input_file_id=batch.input_file_id,
                                     completion_window="24h", endpoint="/v1/chat/completions")
        with pytest.raises(openai.NotFoundError):
            await bob.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):  # the same answer as for no such file
            await alice.files.retrieve(mine.id)
        assert (await alice.files.content(own.id)).content == b"hello"
    # On disk the owner is a digest of the key, never the key.
    stored = [(path.name, path.read_text()) for path in tmp_path.rglob("*.json")]
    assert stored and not any("key-alice" in text or "key-bob" in text for _, text in stored)
    alice_id = "key:" + hashlib.sha256(b"key-alice").hexdigest()[:16]
    assert json.loads((tmp_path / "files" / "files" / f"{own.id}.json").read_text())["owner"] \
        == alice_id
    assert json.loads((tmp_path / "files" / "batches" / f"{batch.id}.json").read_text())[
        "owner"] == alice_id


async def test_files_stored_without_keys_are_nobodys_once_keys_are_configured(
    start_batch_router: Callable[..., Any]
) -> None:
    open_router: RouterUnderTest = await start_batch_router()
    async with sdk(open_router) as client:
        stored = await client.files.create(file=("a.txt", b"open"), purpose="user_data")
    await open_router.server.close()
    keyed: RouterUnderTest = await start_batch_router(api_keys=("key-alice",))
    async with key_sdk(keyed, "key-alice") as alice:
        assert (await alice.files.list()).data == []
        with pytest.raises(openai.NotFoundError):
            await alice.files.retrieve(stored.id)
    assert keyed.app[BATCHES].files.used("") == len(b"open")  # still counted in the total


async def test_storage_quotas_per_key_and_in_total_refuse_uploads_with_413(
    start_batch_router: Callable[..., Any], tmp_path: Path
) -> None:
    router: RouterUnderTest = await start_batch_router(
        api_keys=("key-alice", "key-bob"), file_storage_quota_per_key=1000,
        file_storage_quota=1500)
    async with key_sdk(router, "key-alice") as alice, key_sdk(router, "key-bob") as bob:
        first = await alice.files.create(file=("a", b"a" * 600), purpose="user_data")
        with pytest.raises(openai.APIStatusError) as over_key:
            await alice.files.create(file=("b", b"b" * 600), purpose="user_data")
        assert over_key.value.status_code == 413
        assert over_key.value.body["code"] == "storage_quota_exceeded"  # type: ignore[index]
        await bob.files.create(file=("c", b"c" * 600), purpose="user_data")  # his own quota
        with pytest.raises(openai.APIStatusError) as over_total:  # 1200 + 600 > 1500
            await bob.files.create(file=("d", b"d" * 600), purpose="user_data")
        assert over_total.value.status_code == 413
        await alice.files.delete(first.id)  # room again
        await alice.files.create(file=("e", b"e" * 900), purpose="user_data")  # 1500 in all
    files = router.app[BATCHES].files
    assert (files.used("key:" + hashlib.sha256(b"key-alice").hexdigest()[:16]),
            files.used("key:" + hashlib.sha256(b"key-bob").hexdigest()[:16])) == (900, 600)
    on_disk = sorted(p.stat().st_size for p in (tmp_path / "files" / "files").iterdir()
                     if p.suffix != ".json")
    assert on_disk == [600, 900]  # nothing left of the refused uploads


async def test_an_upload_past_the_quota_is_cut_while_it_streams_and_nothing_is_kept(
    start_batch_router: Callable[..., Any], tmp_path: Path
) -> None:
    quota = 2 * 2**20
    router: RouterUnderTest = await start_batch_router(file_storage_quota_per_key=quota)
    block = b"x" * 2**20
    sent = 0
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"batch\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\n\r\n").encode()

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield head
        for _ in range(64):
            sent += len(block)
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    stored = 0  # the most the partial file ever held, as seen from outside

    def largest() -> int:
        return max((p.stat().st_size for p in (tmp_path / "files" / "files").iterdir()),
                   default=0)

    async def watch() -> None:
        nonlocal stored
        while True:
            with contextlib.suppress(FileNotFoundError):
                stored = max(stored, await asyncio.to_thread(largest))
            await asyncio.sleep(0.002)

    status = None
    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(router.url + "/v1/files", data=body(),
                                    headers={"Content-Type": content_type()}) as response:
                status = response.status
                error = (await response.json())["error"]
        except aiohttp.ClientError:
            pass  # the router may close the connection before the client reads its answer
    watcher.cancel()
    print(f"\nquota {quota} bytes: the client had sent {sent / 2**20:.0f} MiB of 64 when "
          f"the upload ended (status {status}); the partial file held at most {stored} bytes")
    if status is not None:
        assert status == 413 and error["code"] == "storage_quota_exceeded"
    assert sent < 64 * len(block) and stored <= quota
    assert list((tmp_path / "files" / "files").iterdir()) == []
    assert router.app[BATCHES].files.used("") == 0


def test_the_hash_set_of_validation_finds_each_repeat_as_a_set_would() -> None:
    values = [hash(f"request-{n}") for n in range(50_000)] + [0, 1, -1, -2**63, 2**63 - 1]
    seen = HashSet()
    assert all(seen.add(value) for value in values[:-4])  # 0 and 1 share a slot marker
    assert not seen.add(1)
    assert all(seen.add(value) for value in values[-3:])
    assert not any(seen.add(value) for value in values)
    assert len(seen._table) <= 4 * 2 ** 16  # 8 bytes a slot, at most half full
