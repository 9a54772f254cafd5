"""A multi-turn chat workload with shared prefixes, and what the engines say it cost: the
routing-quality experiment of `test_kv_routing.py`, also runnable by hand against any fleet.

The workload: conversations, each opened by one of a few long system prompts (shared by
tenants), then several user turns; a bounded number of conversations in flight at once, each
sending its next turn when the previous answer came back, with that answer appended to its
history. Every request streams (`stream: true`, temperature 0, a few tokens), so the client
measures the time to the first token. All text is drawn, seeded, from the tiny model's
word-level vocabulary (`build_models.WORDS`): any other word would become `<unk>`.

The measure: the engines' own counters, scraped from each engine's `/metrics` before and after
(deltas): the fleet's prefix-cache hit rate is the sum of `vllm:prefix_cache_hits_total` over
the sum of `vllm:prefix_cache_queries_total`; each engine's share of the requests is its
`vllm:request_success_total`. What the router believes is never used.

By hand, in front of running routers and engines:

    .venv/bin/python -m tests.e2e.kv_workload --router http://127.0.0.1:8001 \\
        --router http://127.0.0.1:8002 --engine http://127.0.0.1:8101 ... [--session-header]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.build_models import WORDS

SESSION_HEADER = "x-session-id"
TEMPLATE_TOKENS_PER_MESSAGE = 1
"""`role:` before each message in the tiny model's chat template (`build_models`)."""


# --- the workload --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """Everything that shapes the traffic; the same seed gives the same conversations."""

    model: str = "tiny-llama"
    seed: int = 1234
    conversations: int = 36
    turns: int = 5
    system_prompts: int = 4
    """Tenants share these: conversation `i` opens with system prompt `i % system_prompts`."""
    system_words: int = 256
    user_words: tuple[int, int] = (32, 64)
    """Each user turn's length in words (tokens), drawn between the two, inclusive."""
    concurrency: int = 6
    """Conversations in flight at once."""
    max_tokens: int = 16
    request_timeout: float = 120.0
    attempts: int = 3
    """Tries per turn: a turn that fails (an error, a stream cut short) is sent again."""
    deadline: float = 420.0
    """Seconds for the whole run: past it no request starts, and the run says it timed out."""

    def build(self) -> list[Conversation]:
        """The conversations in the order they start (shuffled: tenants interleave)."""
        rng = random.Random(self.seed)
        systems = [" ".join(rng.choice(WORDS) for _ in range(self.system_words))
                   for _ in range(self.system_prompts)]
        conversations = [
            Conversation(
                id=f"conversation-{number:03d}", system=systems[number % self.system_prompts],
                tenant=number % self.system_prompts,
                users=[" ".join(rng.choice(WORDS) for _ in range(rng.randint(*self.user_words)))
                       for _ in range(self.turns)])
            for number in range(self.conversations)]
        rng.shuffle(conversations)
        return conversations

    @property
    def requests(self) -> int:
        return self.conversations * self.turns

    def describe(self, block_size: int) -> dict[str, float]:
        """Token and block counts of the workload, answers taken at `max_tokens`: to size
        the engines' KV caches against it."""
        conversations = self.build()
        per_message = TEMPLATE_TOKENS_PER_MESSAGE
        system = 1 + per_message + self.system_words  # <s>, "system:", the words
        prompts: list[int] = []
        unique_blocks: list[int] = []
        for conversation in conversations:
            length = system
            for number, user in enumerate(conversation.users):
                if number:
                    length += per_message + self.max_tokens  # the previous answer
                length += per_message + len(user.split())
                prompts.append(length + 1)  # "assistant:"
            final = length + 1 + self.max_tokens
            unique_blocks.append(final // block_size - system // block_size)
        shared = self.system_prompts * (system // block_size)
        active = sorted(unique_blocks)[-self.concurrency:]
        return {
            "requests": len(prompts),
            "prompt_tokens_mean": statistics.fmean(prompts),
            "prompt_tokens_max": max(prompts),
            "system_blocks_each": system // block_size,
            "shared_blocks": shared,
            "unique_blocks_per_conversation": statistics.fmean(unique_blocks),
            "all_blocks": shared + sum(unique_blocks),
            "in_flight_working_set_blocks": shared + sum(active),
        }


@dataclass
class Conversation:
    id: str
    system: str
    tenant: int
    users: list[str]
    answers: list[str] = field(default_factory=list)

    def messages(self, turn: int) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}]
        for number in range(turn):
            messages.append({"role": "user", "content": self.users[number]})
            messages.append({"role": "assistant", "content": self.answers[number]})
        messages.append({"role": "user", "content": self.users[turn]})
        return messages


# --- driving it ----------------------------------------------------------------------------------

@dataclass
class Record:
    """One request as the client saw it."""

    conversation: str
    turn: int
    attempt: int
    router: str
    phase: str
    started: float
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int | None = None
    error: str | None = None


@dataclass
class Pause:
    """Something to do in the middle of a run (an engine restart) while traffic goes on.

    Once `after` requests have completed, `action` starts; requests keep starting while it
    runs, `budget` of them at most, then starts wait for it. The action may call
    `Driver.quiesce` (no more starts; wait for those in flight) before it returns, e.g. to
    read the engines' counters at a clean boundary. Requests started before the action are
    the phase "before", while it runs "during", after it "after"."""

    after: int
    budget: int
    action: Callable[[Driver], Awaitable[None]]


class Driver:
    """Runs a workload against routers: `concurrency` conversations at once, each turn sent to
    a router drawn at random (seeded), streamed."""

    def __init__(self, workload: Workload, routers: Sequence[str], *,
                 session_header: bool = False, pause: Pause | None = None) -> None:
        if not routers:
            raise ValueError("no router to send to")
        self.workload = workload
        self.routers = list(routers)
        self.session_header = session_header
        self.pause = pause
        self.records: list[Record] = []
        self.timed_out = False
        self.abandoned: list[str] = []
        self._rng = random.Random(workload.seed + 1)
        self._completed = 0
        self._in_flight = 0
        self._phase = "before"
        self._started_during = 0
        self._may_start = asyncio.Event()
        self._may_start.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._action: asyncio.Task[None] | None = None
        self._deadline = 0.0

    async def run(self) -> list[Record]:
        conversations = self.workload.build()
        queue: asyncio.Queue[Conversation] = asyncio.Queue()
        for conversation in conversations:
            queue.put_nowait(conversation)
        self._deadline = time.monotonic() + self.workload.deadline
        timeout = aiohttp.ClientTimeout(total=self.workload.request_timeout,
                                        sock_connect=10, sock_read=60)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            workers = [asyncio.create_task(self._worker(session, queue))
                       for _ in range(min(self.workload.concurrency, len(conversations)))]
            try:
                await asyncio.gather(*workers)
                if self._action is not None:
                    await asyncio.wait_for(asyncio.shield(self._action),
                                           max(1.0, self._deadline - time.monotonic()))
            finally:
                for task in [*workers, *([self._action] if self._action else [])]:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if self._action is not None:
                    await asyncio.gather(self._action, return_exceptions=True)
        if self._action is not None and not self._action.cancelled() \
                and self._action.exception() is not None:
            raise RuntimeError("the pause action failed") from self._action.exception()
        return self.records

    async def quiesce(self, timeout: float = 180.0) -> None:
        """Hold new requests and wait until none is in flight (for the pause action)."""
        self._may_start.clear()
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def _worker(self, session: aiohttp.ClientSession,
                      queue: asyncio.Queue[Conversation]) -> None:
        while not queue.empty():
            conversation = queue.get_nowait()
            for turn in range(len(conversation.users)):
                answer = await self._turn(session, conversation, turn)
                if answer is None:
                    self.abandoned.append(conversation.id)
                    break
                conversation.answers.append(answer)

    async def _turn(self, session: aiohttp.ClientSession, conversation: Conversation,
                    turn: int) -> str | None:
        for attempt in range(self.workload.attempts):
            if attempt:
                await asyncio.sleep(1.0)
            if not await self._start():
                return None
            record = Record(conversation.id, turn, attempt, self._rng.choice(self.routers),
                            self._phase, time.monotonic())
            self.records.append(record)
            try:
                answer = await self._send(session, conversation, turn, record)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
                record.error = f"{type(error).__name__}: {error}"[:300]
                answer = None
            finally:
                record.latency = time.monotonic() - record.started
                self._finish()
            if answer is not None:
                return answer
        return None

    async def _start(self) -> bool:
        """Wait until a request may start; False past the deadline."""
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                return False
            if self._may_start.is_set():
                break
            try:
                await asyncio.wait_for(self._may_start.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        if self._phase == "during":
            self._started_during += 1
            if self.pause is not None and self._started_during >= self.pause.budget:
                self._may_start.clear()
        self._in_flight += 1
        self._idle.clear()
        return True

    def _finish(self) -> None:
        self._in_flight -= 1
        self._completed += 1
        if self._in_flight == 0:
            self._idle.set()
        pause = self.pause
        if pause is not None and self._action is None and self._completed >= pause.after:
            self._phase = "during"
            if pause.budget <= 0:
                self._may_start.clear()
            self._action = asyncio.create_task(self._run_action(pause))

    async def _run_action(self, pause: Pause) -> None:
        try:
            await pause.action(self)
        finally:
            self._phase = "after"
            self._may_start.set()

    async def _send(self, session: aiohttp.ClientSession, conversation: Conversation,
                    turn: int, record: Record) -> str | None:
        body: dict[str, Any] = {
            "model": self.workload.model, "messages": conversation.messages(turn),
            "max_tokens": self.workload.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {SESSION_HEADER: conversation.id} if self.session_header else {}
        pieces: list[str] = []
        done = False
        async with session.post(record.router + "/v1/chat/completions", json=body,
                                headers=headers) as response:
            if response.status != 200:
                text = await response.text()
                record.error = f"HTTP {response.status}: {text[:200]}"
                return None
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"error event: {json.dumps(chunk)[:200]}"
                    return None
                if chunk.get("choices"):
                    if record.ttft is None:
                        record.ttft = time.monotonic() - record.started
                    content = chunk["choices"][0].get("delta", {}).get("content")
                    if content:
                        pieces.append(content)
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
        if not done:
            record.error = "the stream ended without [DONE]"
            return None
        return "".join(pieces).strip()


# --- the engines' counters ----------------------------------------------------------------------

@dataclass(frozen=True)
class Counters:
    """One engine's cumulative counters (or a difference of two readings)."""

    hits: float = 0.0
    queries: float = 0.0
    requests: float = 0.0
    prompt_tokens: float = 0.0
    preemptions: float = 0.0

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


METRICS = {
    "hits": "vllm:prefix_cache_hits_total",
    "queries": "vllm:prefix_cache_queries_total",
    "requests": "vllm:request_success_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "preemptions": "vllm:num_preemptions_total",
}


def parse_counters(text: str) -> Counters:
    sums = dict.fromkeys(METRICS, 0.0)
    names = {name: key for key, name in METRICS.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = names.get(sample.name)
            if key is not None:
                sums[key] += sample.value
    return Counters(**sums)


async def scrape(engines: Sequence[str], timeout: float = 10.0) -> list[Counters]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(url: str) -> Counters:
            async with session.get(url + "/metrics") as response:
                response.raise_for_status()
                return parse_counters(await response.text())
        return list(await asyncio.gather(*(one(url) for url in engines)))


def deltas(after: Sequence[Counters], before: Sequence[Counters]) -> list[Counters]:
    return [a - b for a, b in zip(after, before, strict=True)]


# --- the report ---------------------------------------------------------------------------------

@dataclass
class Result:
    """One policy's run: the engines' counter deltas and the client's records."""

    name: str
    engines: list[Counters]
    records: list[Record]
    wall: float
    timed_out: bool = False
    abandoned: list[str] = field(default_factory=list)
    notes: str = ""

    @property
    def hit_rate(self) -> float:
        queries = sum(engine.queries for engine in self.engines)
        return sum(engine.hits for engine in self.engines) / queries if queries else 0.0

    @property
    def requests(self) -> list[int]:
        return [round(engine.requests) for engine in self.engines]

    @property
    def max_share(self) -> float:
        total = sum(self.requests)
        return max(self.requests) / total if total else 0.0

    @property
    def errors(self) -> int:
        return sum(record.error is not None for record in self.records)

    def ttft(self, quantile: float, phase: str | None = None) -> float:
        values = sorted(record.ttft for record in self.records
                        if record.ttft is not None and record.error is None
                        and (phase is None or record.phase == phase))
        if not values:
            return math.nan
        return values[min(len(values) - 1, max(0, math.ceil(quantile * len(values)) - 1))]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "hit_rate": round(self.hit_rate, 4),
                "requests": self.requests, "max_share": round(self.max_share, 3),
                "ttft_p50": round(self.ttft(0.5), 4), "ttft_p90": round(self.ttft(0.9), 4),
                "errors": self.errors, "sent": len(self.records), "wall": round(self.wall, 1),
                "timed_out": self.timed_out, "abandoned": len(self.abandoned),
                "preemptions": round(sum(engine.preemptions for engine in self.engines))}


def markdown(rows: Sequence[tuple[Result, Result | None]]) -> str:
    """The table for the docs: one row per run, its hit rate also relative to a reference
    run's (the oracle's, over the same part of the workload)."""
    lines = ["| run | fleet hit rate | x oracle | requests per engine | TTFT p50 (ms) "
             "| TTFT p90 (ms) | failed requests | wall (s) | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result, reference in rows:
        ratio = (f"{result.hit_rate / reference.hit_rate:.2f}"
                 if reference is not None and reference.hit_rate else "-")
        lines.append(
            f"| {result.name} | {result.hit_rate:.3f} | {ratio} | "
            f"{' / '.join(map(str, result.requests))} | {result.ttft(0.5) * 1000:.0f} | "
            f"{result.ttft(0.9) * 1000:.0f} | {result.errors} | {result.wall:.0f} "
            f"| {result.notes} |")
    return "\n".join(lines) + "\n"


async def measure(name: str, workload: Workload, routers: Sequence[str],
                  engines: Sequence[str], *, session_header: bool = False) -> Result:
    """One run between two readings of the engines' counters."""
    before = await scrape(engines)
    driver = Driver(workload, routers, session_header=session_header)
    start = time.monotonic()
    records = await driver.run()
    wall = time.monotonic() - start
    after = await scrape(engines)
    return Result(name, deltas(after, before), records, wall, driver.timed_out,
                  driver.abandoned)


# --- by hand ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    defaults = Workload()
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.kv_workload",
        description="Send the multi-turn shared-prefix workload through routers; report the "
                    "engines' own prefix-cache hit rate, requests per engine and TTFT.")
    parser.add_argument("--router", action="append", required=True,
                        help="a router's base URL; repeat for replicas (one drawn per request)")
    parser.add_argument("--engine", action="append", default=[],
                        help="an engine's base URL, whose /metrics is read; repeat")
    parser.add_argument("--name", default="run", help="the row's name in the table")
    parser.add_argument("--session-header", action="store_true",
                        help=f"send {SESSION_HEADER}: <conversation id> (the oracle run)")
    parser.add_argument("--block-size", type=int, default=32,
                        help="for the workload's description in blocks (default 32)")
    for item in fields(Workload):
        if item.name in ("user_words",):
            continue
        default = getattr(defaults, item.name)
        parser.add_argument("--" + item.name.replace("_", "-"), type=type(default),
                            default=default, help=f"(default {default})")
    parser.add_argument("--user-words", type=int, nargs=2, default=defaults.user_words,
                        help=f"shortest and longest user turn (default {defaults.user_words})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {item.name: getattr(args, item.name) for item in fields(Workload)}
    values["user_words"] = tuple(args.user_words)
    workload = replace(defaults, **values)
    print(json.dumps(workload.describe(args.block_size)))
    result = asyncio.run(measure(args.name, workload, args.router, args.engine,
                                 session_header=args.session_header))
    print(json.dumps(result.summary()))
    print(markdown([(result, None)]), end="")


if __name__ == "__main__":
    main()
