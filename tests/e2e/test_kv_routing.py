"""Routing quality with real engines: how much of the prompts' KV cache each policy reuses.

Three vLLM CPU engines of the tiny Llama, KV events on, prefix caching on, each with a KV
cache clearly smaller than the workload's working set (`NUM_BLOCKS`), so where a request goes
decides whether its prefix is still cached. Two router replicas per policy, each request sent
to one at random. The workload (`kv_workload`): multi-turn chats opened by a few shared long
system prompts, several conversations in flight, streamed answers appended to the history.

Policies, same workload each, caches reset between runs: `roundrobin`, `prefixaware`,
`kvaware`, and an oracle: `session` with `x-session-id: <conversation>` (each conversation
pinned to one engine by consistent hashing; only that run sends the header). Measured from
the engines' own counters (`/metrics` deltas): the fleet's prefix-cache hit rate, requests
per engine; and the client's TTFT. Then the restart scenario, for `kvaware` and the oracle:
half-way through, one engine is killed and started again (same ports, empty cache) while
traffic goes on; the hit rate of the rest of the run is compared.

The table goes to the terminal summary, to the test's temp directory and to
`.e2e-cache/kv-routing.md`. `make e2e` runs it (six to eight minutes on two cores); alone:
`ROUTER_E2E_PYTHON=.venv-e2e/bin/python .venv/bin/python -m pytest -m e2e
tests/e2e/test_kv_routing.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.build_models import WORDS
from tests.e2e.conftest import (
    ENGINE_START_TIMEOUT, MODEL, ROOT, add_report, build, free_port, stop, wait_for,
)
from tests.e2e.kv_workload import (
    Counters, Driver, Pause, Result, Workload, deltas, markdown, measure, scrape,
)

pytestmark = pytest.mark.e2e

ENGINES = 3
REPLICAS = 2
BLOCK_SIZE = 32
MAX_MODEL_LEN = 768
NUM_BLOCKS = 56
"""KV cache blocks per engine (one of them vLLM's null block). The workload keeps about 100
blocks busy at once (4 shared system prompts of 8 blocks, 6 conversations of up to 12 blocks
of their own): each engine holds about half of it, the fleet all of it."""
WORKLOAD = Workload(model=MODEL)
RESTART_BUDGET = 18
"""Requests sent once the engine is killed; the next ones wait until it is back (it takes
20-60 s; the traffic would be over by then)."""
REPORT = Path(os.environ.get("ROUTER_E2E_CACHE", ROOT / ".e2e-cache")) / "kv-routing.md"
ROUTER_FLAGS = ("--engine-stats-interval", "1", "--health-check-interval", "1")
WAIT = 60.0
"""Seconds for anything but an engine's start: a router's, a cache reset, a health check."""


@dataclass(frozen=True)
class Policy:
    name: str
    routing_logic: str
    session_header: bool = False
    flags: tuple[str, ...] = ()
    """More router flags (to compare settings of one policy by hand)."""


POLICIES = {
    "roundrobin": Policy("roundrobin", "roundrobin"),
    "prefixaware": Policy("prefixaware", "prefixaware"),
    "oracle": Policy("oracle (session)", "session", session_header=True),
    "kvaware": Policy("kvaware", "kvaware"),
}


def kvaware_missing() -> str | None:
    """Why the router has no `kvaware` policy of its own yet, None when it has one. (The
    flag's value is accepted before: production-stack's name, routed as prefixaware.)"""
    done = subprocess.run(
        [sys.executable, "-c",
         "from router.policies import POLICIES; print('kvaware' in POLICIES)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return f"the router does not import: {done.stderr.strip()[-300:]}"
    if done.stdout.strip() != "True":
        return ("the router has no kvaware policy yet (router.policies.POLICIES; "
                "--routing-logic kvaware still routes as prefixaware)")
    return None


# --- engines ------------------------------------------------------------------------------------

@dataclass
class Engine:
    """One vLLM engine on fixed ports, in a process group of its own (its EngineCore child
    holds the KV event ports: killing the API server alone would leave it bound)."""

    number: int
    python: str
    model: Path
    logs: Path
    port: int = field(default_factory=free_port)
    events: int = field(default_factory=free_port)
    replay: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.logs / f"vllm{self.number}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        # vLLM binds the PUB socket only for a wildcard endpoint: `tcp://127.0.0.1:P` would make
        # it connect out to P, where no one listens (the replay socket always binds). The
        # router reads both from /kv_event_sources, `*` standing for the engine's host.
        events = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://*:{self.events}",
                  "replay_endpoint": f"tcp://127.0.0.1:{self.replay}", "topic": "kv"}
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "VLLM_SERVER_DEV_MODE": "1", "TOKENIZERS_PARALLELISM": "false",
                   # Three engines on two cores: let the OS place them (vLLM would bind every
                   # engine's worker to core 0), and keep the model in the EngineCore process
                   # (the "uni" executor): a worker process of its own spins on shared memory
                   # for a second after every step, which here halves the fleet's speed.
                   "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [self.python, "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(self.model), "--served-model-name", MODEL,
                 "--host", "127.0.0.1", "--port", str(self.port),
                 "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
                 "--enforce-eager", "--block-size", str(BLOCK_SIZE),
                 "--num-gpu-blocks-override", str(NUM_BLOCKS),
                 "--kv-events-config", json.dumps(events)],
                stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True)

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_for(self.url + "/health", ENGINE_START_TIMEOUT, self.process, self.log)

    def kill(self) -> None:
        """As a crash: SIGKILL to the whole process group, nothing flushed."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self._signal_group(signal.SIGKILL)  # whatever of the group outlived its leader

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


def post_json(url: str, body: object | None = None, timeout: float = 30.0) -> object:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode() if body is not None else b"",
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_json(url: str, timeout: float = 10.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def reset_caches(engines: Sequence[Engine]) -> None:
    """Empty every engine's prefix cache (vLLM refuses while blocks are held: retried)."""
    for engine in engines:
        deadline = time.monotonic() + WAIT
        while True:
            answer = post_json(engine.url + "/reset_prefix_cache")
            if isinstance(answer, dict) and answer.get("success") is True:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{engine.url}: /reset_prefix_cache kept failing: {answer}")
            time.sleep(0.5)
    time.sleep(1.0)  # the AllBlocksCleared events reach whoever listens


@dataclass
class KvFleet:
    engines: list[Engine]
    logs: Path

    @property
    def urls(self) -> list[str]:
        return [engine.url for engine in self.engines]


@pytest.fixture(scope="module")
def kv_fleet(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvFleet]:
    logs = tmp_path_factory.mktemp("kv-routing")
    model = build(vllm_python, "llama", MODEL)
    engines = [Engine(number, vllm_python, model, logs) for number in range(ENGINES)]
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready()
        for engine in engines:  # the first request of an engine is slow: not in any run
            post_json(engine.url + "/v1/chat/completions",
                      {"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": 4}, timeout=WAIT)
        yield KvFleet(engines, logs)
    finally:
        for engine in engines:
            if engine.process is not None and engine.process.poll() is None:
                engine.process.send_signal(signal.SIGINT)
        for engine in engines:
            engine.stop()


# --- routers ------------------------------------------------------------------------------------

def engines_listing(router: str) -> list[dict[str, object]]:
    listing = get_json(router + "/engines")
    assert isinstance(listing, list)
    return listing


def wait_until_routable(routers: Sequence[str], engines: Sequence[str],
                        events: bool = False) -> None:
    """Every router sees every engine healthy, has scraped it and (kvaware) follows its KV
    events."""
    deadline = time.monotonic() + WAIT
    while True:
        missing = []
        for router in routers:
            seen = {entry["url"]: entry for entry in engines_listing(router)}
            missing += [(router, url) for url in engines
                        if url not in seen or not seen[url]["healthy"]
                        or seen[url]["engine"] is None
                        or events and seen[url].get("kv_events", {}) is None]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not routable after {WAIT:.0f} s: {missing}")
        time.sleep(0.5)


@contextmanager
def routers(policy: Policy, fleet: KvFleet, tag: str) -> Iterator[list[str]]:
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for replica in range(REPLICAS):
            port = free_port()
            log = fleet.logs / f"router-{tag}-{replica}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
                     "--static-backends", ",".join(fleet.urls),
                     "--static-models", ",".join([MODEL] * len(fleet.urls)),
                     "--routing-logic", policy.routing_logic, *ROUTER_FLAGS, *policy.flags],
                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            processes.append(process)
            urls.append(f"http://127.0.0.1:{port}")
            wait_for(urls[-1] + "/ready", WAIT, process, log)
        wait_until_routable(urls, fleet.urls, events=policy.routing_logic == "kvaware")
        yield urls
        for replica, url in enumerate(urls):  # what each replica believed, for diagnosis
            (fleet.logs / f"router-{tag}-{replica}-engines.json").write_text(
                json.dumps(engines_listing(url), indent=1))
    finally:
        for process in processes:
            stop(process)


# --- the experiment -----------------------------------------------------------------------------

class Experiment:
    """Runs each policy once (on demand, kept), writes the table after every run."""

    def __init__(self, fleet: KvFleet) -> None:
        self.fleet = fleet
        self.results: dict[str, Result] = {}
        self.reference: dict[str, str] = {}
        """A result's key -> the key of the oracle result it is compared with."""
        self.started = time.monotonic()

    def run(self, key: str) -> Result:
        if key not in self.results:
            policy = POLICIES[key]
            reset_caches(self.fleet.engines)
            with routers(policy, self.fleet, key) as urls:
                self.results[key] = asyncio.run(measure(
                    policy.name, WORKLOAD, urls, self.fleet.urls,
                    session_header=policy.session_header))
            self.reference[key] = "oracle"
            self.write()
        return self.results[key]

    def restart(self, key: str) -> Result:
        """The run with an engine restarted half-way; the result is the part after it."""
        after = f"{key}-after-restart"
        if after not in self.results:
            policy = POLICIES[key]
            reset_caches(self.fleet.engines)
            with routers(policy, self.fleet, f"{key}-restart") as urls:
                whole, rest = asyncio.run(self._measure_restart(policy, urls))
            self.results[f"{key}-restart"] = whole
            self.results[after] = rest
            self.reference[f"{key}-restart"] = "oracle-restart"
            self.reference[after] = "oracle-after-restart"
            self.write()
        return self.results[after]

    async def _measure_restart(self, policy: Policy, urls: list[str]) -> tuple[Result, Result]:
        fleet = self.fleet
        victim = fleet.engines[0]
        marks: dict[str, list[Counters]] = {}
        times: dict[str, float] = {}

        async def restart(driver: Driver) -> None:
            marks["kill"] = await scrape(fleet.urls)
            await asyncio.to_thread(victim.kill)
            times["killed"] = time.monotonic()
            await asyncio.to_thread(victim.start)
            await asyncio.to_thread(victim.wait_ready)
            await asyncio.to_thread(wait_until_routable, urls, fleet.urls)
            await driver.quiesce()
            times["resumed"] = time.monotonic()
            marks["resume"] = await scrape(fleet.urls)

        driver = Driver(WORKLOAD, urls, session_header=policy.session_header,
                        pause=Pause(WORKLOAD.requests // 2, RESTART_BUDGET, restart))
        before = await scrape(fleet.urls)
        start = time.monotonic()
        records = await driver.run()
        end = time.monotonic()
        last = await scrape(fleet.urls)
        if "resume" not in marks:
            raise RuntimeError(f"the restart never finished (timed out: {driver.timed_out})")
        # The restarted engine's counters start again from zero.
        whole = deltas(last, before)
        whole[0] = (marks["kill"][0] - before[0]) + last[0]
        rest = deltas(last, marks["resume"])
        down = times["resumed"] - times["killed"]
        later = [record for record in records if record.phase == "after"]
        return (
            Result(f"{policy.name}, engine restart", whole, records, end - start,
                   driver.timed_out, driver.abandoned, notes=f"engine down {down:.0f} s"),
            Result(f"{policy.name}, after the restart", rest, later, end - times["resumed"],
                   driver.timed_out, driver.abandoned,
                   notes=f"the {len(later)} requests sent once the engine was back"),
        )

    def table(self) -> str:
        order = ["roundrobin", "prefixaware", "oracle", "kvaware", "oracle-restart",
                 "kvaware-restart", "oracle-after-restart", "kvaware-after-restart"]
        rows = [(self.results[key], self.results.get(self.reference[key]))
                for key in order if key in self.results]
        described = WORKLOAD.describe(BLOCK_SIZE)
        return (
            f"{ENGINES} vLLM CPU engines (tiny Llama, block size {BLOCK_SIZE}, "
            f"{NUM_BLOCKS} KV blocks each), {REPLICAS} router replicas, "
            f"{WORKLOAD.conversations} conversations x {WORKLOAD.turns} turns, "
            f"{WORKLOAD.system_prompts} shared system prompts of {WORKLOAD.system_words} words, "
            f"{WORKLOAD.concurrency} conversations in flight, max_tokens {WORKLOAD.max_tokens}; "
            f"up to {described['in_flight_working_set_blocks']:.0f} blocks in use at once, "
            f"{described['all_blocks']:.0f} over the run. Hit rates are the engines' own "
            "(prefix_cache_hits / prefix_cache_queries).\n\n"
            + markdown(rows)
            + f"\nwall time so far: {time.monotonic() - self.started:.0f} s\n")

    def write(self) -> None:
        text = self.table()
        summaries = {key: result.summary() for key, result in self.results.items()}
        for directory in (self.fleet.logs, REPORT.parent):
            directory.mkdir(parents=True, exist_ok=True)
        (self.fleet.logs / "kv-routing.md").write_text(text)
        (self.fleet.logs / "kv-routing.json").write_text(json.dumps(summaries, indent=1))
        REPORT.write_text(text)


@pytest.fixture(scope="module")
def experiment(kv_fleet: KvFleet, request: pytest.FixtureRequest) -> Iterator[Experiment]:
    experiment = Experiment(kv_fleet)
    yield experiment
    if experiment.results:
        add_report(request.config, "kv-aware routing (tests/e2e/test_kv_routing.py)",
                   experiment.table() + f"\nlogs: {kv_fleet.logs}\n")


def healthy_run(result: Result) -> None:
    assert not result.timed_out, result.summary()
    assert not result.abandoned, result.summary()
    assert result.errors == 0, [r.error for r in result.records if r.error][:5]
    assert sum(result.requests) >= WORKLOAD.requests, result.summary()


# --- the tests ----------------------------------------------------------------------------------

def test_the_workload_speaks_the_vocabulary_and_overflows_each_cache() -> None:
    vocabulary = set(WORDS)
    conversations = WORKLOAD.build()
    for conversation in conversations:
        assert set(conversation.system.split()) <= vocabulary
        assert all(set(user.split()) <= vocabulary for user in conversation.users)
    described = WORKLOAD.describe(BLOCK_SIZE)
    assert described["prompt_tokens_max"] + WORKLOAD.max_tokens <= MAX_MODEL_LEN
    # Cache pressure: an engine cannot hold what is in use at once, the fleet can.
    assert NUM_BLOCKS < 0.7 * described["in_flight_working_set_blocks"] < ENGINES * NUM_BLOCKS


def test_the_oracle_beats_round_robin(experiment: Experiment) -> None:
    """The baselines, and the workload's point: pinning conversations must pay."""
    for key in ("roundrobin", "prefixaware", "oracle"):
        healthy_run(experiment.run(key))
    oracle, roundrobin = experiment.results["oracle"], experiment.results["roundrobin"]
    assert oracle.hit_rate > roundrobin.hit_rate + 0.05, experiment.table()


def test_kvaware_reuses_as_much_cache_as_the_oracle(experiment: Experiment) -> None:
    missing = kvaware_missing()
    if missing:
        pytest.skip(missing)
    oracle = experiment.run("oracle")
    kvaware = experiment.run("kvaware")
    healthy_run(kvaware)
    assert kvaware.hit_rate >= 0.9 * oracle.hit_rate, experiment.table()
    assert kvaware.max_share <= 0.5, experiment.table()


def test_kvaware_recovers_from_an_engine_restart(experiment: Experiment) -> None:
    missing = kvaware_missing()
    if missing:
        pytest.skip(missing)
    oracle = experiment.restart("oracle")
    kvaware = experiment.restart("kvaware")
    for result in (oracle, kvaware):
        assert not result.timed_out and not result.abandoned, result.summary()
        assert sum(result.requests) > 0, result.summary()
    assert kvaware.hit_rate >= 0.85 * oracle.hit_rate, experiment.table()


def test_engine_counters_add_up() -> None:
    """What the restart arithmetic relies on."""
    a, b = Counters(10, 20, 3, 40, 0), Counters(1, 2, 1, 4, 0)
    assert (a - b) + b == a
    assert Result("x", [a - b, b], [], 1.0).hit_rate == pytest.approx(10 / 20)
