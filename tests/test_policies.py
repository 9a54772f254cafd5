"""Routing policies and what they read: session keys, prompt text, load scores; driven with
hand-made requests, backends and load figures."""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from router.backends.pool import Backend
from router.config.settings import Config
from router.policies import PolicyContext, RoutingPolicy
from router.policies.features import CONTENT, ESC, ROLE, prompt_text, session_key
from router.policies.leastload import LeastLoad
from router.policies.load import least_loaded, load_score
from router.policies.prefixaware import PrefixAware
from router.policies.roundrobin import RoundRobin
from router.policies.session import Session
from router.proxy.inbound import InboundRequest
from router.stats.engine import EngineSnapshot, EngineStats
from router.stats.requests import RequestStats


def make_request(
    json: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> InboundRequest:
    return InboundRequest(model="m", stream=False,
                          headers=CIMultiDictProxy(CIMultiDict(headers or {})), json=json, body=b"")


def make_context(**settings: Any) -> PolicyContext:
    return PolicyContext(Config(**settings), RequestStats(60), EngineStats())


def make_backends(count: int) -> list[Backend]:
    return [Backend(url=f"http://10.0.0.{n}:8000", models=("m",)) for n in range(1, count + 1)]


def set_in_flight(context: PolicyContext, backend: Backend, count: int) -> None:
    context.stats.for_backend(backend.id).in_flight = count


def set_engine(
    context: PolicyContext, backend: Backend, *, running: float | None = None,
    waiting: float | None = None, age: float = 0.0,
) -> None:
    snapshot = EngineSnapshot(scraped_at=time.monotonic() - age, running=running, waiting=waiting)
    context.engines.update(backend.id, snapshot)


def chat(*texts: str, system: str = "You are a helpful assistant.") -> dict[str, Any]:
    """A chat body: the system prompt, then user and assistant turns in alternation."""
    messages = [{"role": "system", "content": system}]
    messages += [{"role": ("user", "assistant")[n % 2], "content": text}
                 for n, text in enumerate(texts)]
    return {"model": "m", "messages": messages}


# features: session keys


def test_session_key_header_wins_over_body() -> None:
    request = make_request({"x-session-id": "from-body"}, {"X-Session-Id": "from-header"})
    assert session_key(request, "x-session-id") == "from-header"
    assert session_key(make_request({"x-session-id": "from-body"}), "x-session-id") == "from-body"


@pytest.mark.parametrize("headers, body", [
    ({"x_session_id": "k"}, None),
    ({}, {"x_session_id": "k"}),
    ({}, {"x-session-id": "k"}),
])
def test_session_key_takes_either_spelling(
    headers: dict[str, str], body: dict[str, Any] | None
) -> None:
    assert session_key(make_request(body, headers), "x-session-id") == "k"
    assert session_key(make_request(body, headers), "x_session_id") == "k"


def test_session_key_body_field_is_a_non_empty_string_or_an_integer() -> None:
    def key(value: object) -> str | None:
        return session_key(make_request({"session_id": value}), "session_id")

    assert key("abc") == "abc"
    assert key(42) == "42"
    for odd in ["", True, 1.5, None, ["a"], {"id": 1}]:
        assert key(odd) is None, odd
    assert session_key(make_request({"session_id": "abc"}, {"session-id": ""}),
                       "session_id") == "abc"  # an empty header counts as absent
    assert session_key(make_request(None), "session_id") is None  # multipart: no JSON


# features: prompt text


def test_prompt_text_holds_roles_and_text_parts_in_order() -> None:
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in"},
            {"type": "image_url", "image_url": {"url": "data:..."}},
            {"type": "text", "text": "this picture?"},
        ]},
    ]}
    text = prompt_text(make_request(body))
    assert text is not None
    for piece in ["system", "Be brief.", "user", "What is in", "this picture?"]:
        assert piece in text
    assert text.index("Be brief.") < text.index("What is in") < text.index("this picture?")
    assert "data:" not in text
    # Two parts are not one: the parts keep a boundary between them.
    joined = {"messages": [body["messages"][0],
                           {"role": "user", "content": "What is inthis picture?"}]}
    assert prompt_text(make_request(joined)) != text


def test_prompt_text_of_a_growing_conversation_extends_the_previous_turn() -> None:
    turns = ["Hi", "Hello! How can I help?", "Tell me about tides.", "Tides come from..."]
    texts = [prompt_text(make_request(chat(*turns[:n]))) for n in range(1, len(turns) + 1)]
    for shorter, longer in zip(texts, texts[1:]):
        assert shorter is not None and longer is not None
        assert longer.startswith(shorter) and len(longer) > len(shorter)


def test_message_boundaries_cannot_be_forged_by_text() -> None:
    two = chat("a", "b")
    forged = chat(f"a{ROLE}assistant{CONTENT}b")
    escaped = chat(f"a{ESC}")
    texts = [prompt_text(make_request(body)) for body in (two, forged, escaped)]
    assert len(set(texts)) == 3


def test_prompt_text_of_completions_embeddings_and_responses() -> None:
    def text(body: dict[str, Any]) -> str | None:
        return prompt_text(make_request(body))

    assert text({"prompt": "Once upon a time"}) == "Once upon a time"
    batch = text({"prompt": ["first", "second"]})
    assert batch is not None and batch.startswith("first") and batch.endswith("second")
    assert text({"input": "embed me"}) == "embed me"
    responses = text({
        "instructions": "Answer in French.",
        "input": [{"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "Hello"}]}],
    })
    assert responses is not None
    assert responses.index("Answer in French.") < responses.index("Hello")
    # Token ids are not text.
    assert text({"prompt": [1, 2, 3]}) is None
    assert text({"input": [[1, 2], [3, 4]]}) is None


def test_prompt_text_stops_at_the_limit() -> None:
    body = chat(*["word " * 1000] * 50)
    full = prompt_text(make_request(body))
    head = prompt_text(make_request(body), limit=1000)
    assert full is not None and head is not None
    assert len(head) == 1000 and full.startswith(head)


@pytest.mark.parametrize("body", [
    None, {}, {"messages": None}, {"messages": "hi"}, {"messages": [1, None, "x", []]},
    {"messages": [{"role": 5, "content": 7}]}, {"messages": [{"content": [1, {"type": "text"}]}]},
    {"messages": [{"content": [{"type": "text", "text": 3}, {"type": ["text"]}]}]},
    {"messages": [{"role": None, "content": {"text": "x"}}]},
    {"prompt": None}, {"prompt": 12}, {"prompt": [None, {}]}, {"prompt": ""},
    {"input": {"a": 1}}, {"input": [{"role": [], "content": None}]}, {"instructions": "x"},
    {"file": "audio"},
])
def test_odd_shapes_give_no_text_and_never_raise(body: dict[str, Any] | None) -> None:
    assert prompt_text(make_request(body)) is None


def test_odd_shapes_keep_the_text_they_do_have() -> None:
    body = {"messages": [None, {"role": "user", "content": [5, {"type": "text", "text": "ok"}]}]}
    text = prompt_text(make_request(body))
    assert text is not None and "ok" in text


# load


def test_load_score_weighs_waiting_over_running_and_ignores_stale_scrapes() -> None:
    context = make_context(engine_stats_interval=10.0)
    a, b, c, d = make_backends(4)
    set_in_flight(context, a, 3)
    set_engine(context, b, running=3)
    set_engine(context, c, waiting=3)
    set_engine(context, d, running=50, waiting=50, age=31.0)
    assert load_score(context, a) == 3
    assert load_score(context, b) == 3
    assert load_score(context, c) > load_score(context, b)
    assert load_score(context, d) == 0  # three intervals without a scrape: ignored
    # The router's own requests are part of the engine's figures: the larger one counts.
    set_in_flight(context, a, 2)
    set_engine(context, a, running=2, waiting=1)
    assert load_score(context, a) == pytest.approx(max(2, 2 + 1) + 1)
    set_in_flight(context, a, 9)  # sent since the last scrape
    assert load_score(context, a) == pytest.approx(9 + 1)
    assert load_score(context, make_backends(6)[5]) == 0  # never seen


def test_least_loaded_breaks_ties_at_random() -> None:
    context = make_context()
    backends = make_backends(4)
    rng = random.Random(3)
    counts = Counter(least_loaded(context, backends, rng).id for _ in range(400))
    assert len(counts) == 4 and min(counts.values()) > 50
    set_in_flight(context, backends[0], 1)
    set_in_flight(context, backends[1], 1)
    picks = {least_loaded(context, backends, rng).id for _ in range(100)}
    assert picks == {backends[2].id, backends[3].id}


# session


def test_the_same_key_goes_to_the_same_backend_in_any_candidate_order() -> None:
    policy = Session(make_context())
    backends = make_backends(5)
    rng = random.Random(0)
    for n in range(200):
        request = make_request(headers={"x-session-id": f"user-{n}"})
        first = policy.choose(request, backends)
        shuffled = rng.sample(backends, len(backends))
        assert all(policy.choose(request, shuffled) is first for _ in range(3))


def test_separate_routers_agree_on_every_key() -> None:
    """Two policies stand for a restart or a second replica: no per-process hash salt."""
    backends = make_backends(8)
    one, two = Session(make_context()), Session(make_context())
    for n in range(500):
        request = make_request({"x_session_id": n})
        assert one.choose(request, backends) is two.choose(request, backends)
    # Fixed expectations: a change here remaps every live session on upgrade.
    golden = {"alice": 0, "bob": 6, "carol": 1}
    for key, index in golden.items():
        assert one.choose(make_request(headers={"x-session-id": key}), backends) is backends[index]


def owners(policy: Session, backends: Sequence[Backend], keys: list[str]) -> list[str]:
    return [policy.choose(make_request(headers={"x-session-id": key}), backends).id
            for key in keys]


def test_removing_or_adding_a_backend_moves_few_keys() -> None:
    policy = Session(make_context())
    backends = make_backends(11)
    ten, eleventh = backends[:10], backends[10]
    keys = [f"session-{n}" for n in range(10_000)]
    before = owners(policy, ten, keys)

    removed = ten[3]
    after = owners(policy, [b for b in ten if b is not removed], keys)
    moved = [n for n in range(len(keys)) if before[n] != after[n]]
    assert all(before[n] == removed.id for n in moved)
    assert len(moved) == before.count(removed.id)
    print(f"\nremoving 1 of 10 backends moved {len(moved) / len(keys):.4f} of the keys "
          f"(exactly the removed backend's share)")

    grown = owners(policy, ten + [eleventh], keys)
    moved = [n for n in range(len(keys)) if before[n] != grown[n]]
    assert all(grown[n] == eleventh.id for n in moved)
    fraction = len(moved) / len(keys)
    print(f"adding an 11th backend moved {fraction:.4f} of the keys (ideal {1 / 11:.4f})")
    assert 0.06 <= fraction <= 0.125


def test_keys_spread_evenly() -> None:
    backends = make_backends(10)
    counts = Counter(owners(Session(make_context()), backends, [f"k{n}" for n in range(10_000)]))
    print(f"\nkeys per backend over 10: min {min(counts.values())}, max {max(counts.values())}")
    assert len(counts) == 10
    assert 700 <= min(counts.values()) and max(counts.values()) <= 1300


def test_a_request_without_a_key_goes_to_the_least_loaded() -> None:
    context = make_context()
    backends = make_backends(3)
    set_in_flight(context, backends[0], 5)
    set_engine(context, backends[1], waiting=4)
    policy = Session(context)
    assert all(policy.choose(make_request(chat("hi")), backends) is backends[2]
               for _ in range(20))


def test_odd_keys_hash_and_rings_stay_bounded() -> None:
    policy = Session(make_context(), max_rings=4)
    backends = make_backends(6)
    assert policy.choose(make_request({"x_session_id": "\ud800 lone surrogate"}), backends)
    for n in range(20):
        policy.choose(make_request(headers={"x-session-id": "k"}), backends[: n % 5 + 1])
        policy.choose(make_request(headers={"x-session-id": "k"}), backends[n % 6:])
    assert "rings=4/4" in repr(policy)


# leastload


def test_two_choices_avoid_a_backend_with_a_long_queue() -> None:
    context = make_context()
    backends = make_backends(4)
    set_engine(context, backends[0], running=10, waiting=40)
    for backend in backends[1:]:
        set_engine(context, backend, running=10, waiting=0)
    policy = LeastLoad(context)
    counts = Counter(policy.choose(make_request(chat("hi")), backends).id for _ in range(3000))
    print(f"\nqueued backend got {counts[backends[0].id]} of 3000 (fair share 750)")
    assert counts[backends[0].id] < 30
    assert all(counts[b.id] > 800 for b in backends[1:])


def test_two_choices_spread_ties_over_all_backends() -> None:
    policy = LeastLoad(make_context())
    backends = make_backends(4)
    counts = Counter(policy.choose(make_request(), backends).id for _ in range(2000))
    assert len(counts) == 4 and min(counts.values()) > 300
    assert policy.choose(make_request(), backends[:1]) is backends[0]
    assert "LeastLoad" in repr(policy)


# prefixaware


def test_a_growing_conversation_stays_on_one_backend() -> None:
    context = make_context()
    backends = make_backends(4)
    policy = PrefixAware(context)
    turns = [f"turn {n}: " + "some words of this conversation " * 10 for n in range(12)]
    chosen = {policy.choose(make_request(chat(*turns[: n + 1])), backends).id
              for n in range(len(turns))}
    assert len(chosen) == 1


def test_another_conversation_can_go_elsewhere() -> None:
    context = make_context()
    backends = make_backends(2)
    policy = PrefixAware(context)
    agent, mathematician = "Travel agent. " * 300, "Mathematician. " * 300
    first = policy.choose(make_request(chat("Plan a trip to Lisbon.", system=agent)), backends)
    set_in_flight(context, first, 3)  # busier, though not by the 4,000 characters it holds
    other = policy.choose(make_request(chat("Prove that 17 is prime.", system=mathematician)),
                          backends)
    assert other is not first
    follow_up = chat("Plan a trip to Lisbon.", "Day one: Alfama...", "And day two?",
                     system=agent)
    assert policy.choose(make_request(follow_up), backends) is first


def test_a_hot_prefix_spreads_once_its_backend_is_busy() -> None:
    # 4,643 characters held: at 256 tokens of 4 characters per request of load, the home
    # keeps the prompt until it carries more than 4.5 requests over another backend.
    context = make_context(load_cost_tokens=256.0)
    backends = make_backends(3)
    policy = PrefixAware(context)
    body = chat("Summarise this report. " * 200)
    home = policy.choose(make_request(body), backends)
    set_in_flight(context, home, 4)
    assert policy.choose(make_request(body), backends) is home
    set_in_flight(context, home, 5)
    others = [b for b in backends if b is not home]
    set_in_flight(context, others[0], 1)
    assert policy.choose(make_request(body), backends) is others[1]


def test_an_imbalanced_fleet_overrides_affinity() -> None:
    # production-stack's escape stays: past both thresholds load alone decides.
    context = make_context(balance_abs_threshold=2, balance_rel_threshold=1.5,
                           load_cost_tokens=1.0)
    backends = make_backends(3)
    policy = PrefixAware(context)
    body = chat("Summarise this report. " * 200)
    home = policy.choose(make_request(body), backends)
    set_in_flight(context, home, 2)  # a gap of 2 is within the absolute threshold
    assert policy.choose(make_request(body), backends) is home
    set_in_flight(context, home, 3)
    others = [b for b in backends if b is not home]
    set_in_flight(context, others[0], 1)
    assert policy.choose(make_request(body), backends) is others[1]


def test_a_short_shared_prefix_is_not_enough() -> None:
    context = make_context(prefix_match_threshold=0.5)
    backends = make_backends(2)
    policy = PrefixAware(context)
    home = policy.choose(make_request(chat("Hello")), backends)
    set_in_flight(context, home, 1)
    long_new = chat("Hello" + ", and now something entirely different" * 10)
    assert policy.choose(make_request(long_new), backends) is not home


def test_a_backend_that_is_not_a_candidate_is_never_chosen() -> None:
    context = make_context()
    backends = make_backends(3)
    policy = PrefixAware(context)
    turns = ["Write a poem about the sea. " * 5, "The sea is wide...", "Another stanza?"]
    gone = policy.choose(make_request(chat(turns[0])), backends)
    rest = [b for b in backends if b is not gone]
    for n in range(1, 4):
        body = chat(*(turns * 2)[: n + 1])
        assert policy.choose(make_request(body), rest) is not gone


def test_a_request_without_text_goes_to_the_least_loaded() -> None:
    context = make_context()
    backends = make_backends(3)
    set_in_flight(context, backends[0], 3)
    set_engine(context, backends[2], running=1)
    policy = PrefixAware(context)
    for body in [None, {"prompt": [101, 102, 103]}, {"file": "x"}]:
        assert policy.choose(make_request(body), backends) is backends[1]
    assert policy.tree_chars() == 0


def test_the_cache_salt_keeps_prefixes_apart() -> None:
    context = make_context()
    backends = make_backends(2)
    policy = PrefixAware(context)
    body = chat("A long shared question about the weather. " * 50)
    home = policy.choose(make_request({**body, "cache_salt": "tenant-a"}), backends)
    set_in_flight(context, home, 1)
    assert policy.choose(make_request({**body, "cache_salt": "tenant-b"}), backends) is not home
    assert policy.choose(make_request({**body, "cache_salt": "tenant-a"}), backends) is home


def test_the_trees_stay_within_their_bound() -> None:
    context = make_context(prefix_cache_max_chars=100_000)
    policy = PrefixAware(context)
    backends = make_backends(4)
    for n in range(2000):
        policy.choose(make_request(chat(f"question {n} " + "padding " * 50)), backends)
    tree = policy.tree("m")
    assert tree is not None and tree.size <= 100_000
    assert 0 < policy.tree_chars() <= 100_000
    assert "PrefixAware" in repr(policy)


WORDS = ("the of and to in is you that it was for on are as with his they at be this have "
         "from or one had by word but not what all were we when your can said there use an "
         "each which she do how their if will up other about out many then them these so "
         "some her would make like him into time has look two more write go see number no "
         "way could people my than first water been call who oil its now find long down day "
         "did get come made may part").split()
SYSTEM = ("You are a helpful, careful assistant. Answer the user's questions precisely, cite "
          "your sources when you can, and say so when you do not know. ") * 6


def conversations(count: int, turns: int, seed: int = 5) -> list[list[dict[str, Any]]]:
    """`count` chats of `turns` requests each; every request resends the whole history."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    chats = []
    for _ in range(count):
        history: list[str] = []
        bodies = []
        for _ in range(turns):
            history.append(words(30))
            bodies.append(chat(*history, system=SYSTEM))
            history.append(words(60))
        chats.append(bodies)
    return chats


def hit_rate(policy: RoutingPolicy, context: PolicyContext, backends: list[Backend]) -> float:
    """50 conversations x 8 turns, interleaved; a few requests in flight at any time. A hit:
    the request went to the backend that served its conversation's previous turn."""
    chats = conversations(50, 8)
    last: dict[int, str] = {}
    hits = follow_ups = 0
    in_flight: deque[Backend] = deque()
    order = random.Random(9)
    for turn in range(8):
        for conv in order.sample(range(len(chats)), len(chats)):
            backend = policy.choose(make_request(chats[conv][turn]), backends)
            if conv in last:
                follow_ups += 1
                hits += last[conv] == backend.id
            last[conv] = backend.id
            in_flight.append(backend)
            context.stats.for_backend(backend.id).in_flight += 1
            if len(in_flight) > 12:
                context.stats.for_backend(in_flight.popleft().id).in_flight -= 1
    return hits / follow_ups


def test_prefix_affinity_hit_rate_on_a_multi_turn_workload() -> None:
    backends = make_backends(4)
    context = make_context()
    rate = hit_rate(PrefixAware(context), context, backends)
    # Load weighing less than the default: a conversation's own part (a few hundred
    # characters a turn here) keeps it home against a busier backend.
    sticky_context = make_context(load_cost_tokens=32.0)
    sticky = hit_rate(PrefixAware(sticky_context), sticky_context, backends)
    baseline_context = make_context()
    baseline = hit_rate(RoundRobin(baseline_context), baseline_context, backends)
    print(f"\nhit rate, 50 conversations x 8 turns over 4 backends: prefixaware {rate:.3f} "
          f"(--load-cost-tokens 32: {sticky:.3f}), roundrobin {baseline:.3f}")
    assert rate >= 2 * baseline
    assert sticky >= 0.9


@pytest.mark.slow
def test_cost_per_routing_decision() -> None:
    backends = make_backends(8)
    calls = 10_000
    chats = conversations(calls // 8, 8, seed=11)
    # Every request distinct, turns interleaved as live traffic has them.
    requests = [make_request(chats[conv][turn], {"x-session-id": f"s{conv}"})
                for turn in range(8) for conv in range(len(chats))]
    bodies = [request.json for request in requests]
    factories: dict[str, Callable[[PolicyContext], RoutingPolicy]] = {
        "roundrobin": RoundRobin, "session": Session, "leastload": LeastLoad,
        "prefixaware": PrefixAware,
    }
    size = sum(map(len, map(str, bodies))) // len(bodies)
    print(f"\n{len(requests)} distinct chat bodies, ~{size} chars each, 8 backends with "
          f"engine figures")
    for name, factory in factories.items():
        context = make_context()
        for n, backend in enumerate(backends):
            set_in_flight(context, backend, n % 3)
            set_engine(context, backend, running=n, waiting=n % 2)
        policy = factory(context)
        started = time.perf_counter()
        for request in requests:
            policy.choose(request, backends)
        elapsed = time.perf_counter() - started
        print(f"{name:12} {elapsed / calls * 1e6:7.2f} us per decision  {policy!r}")
