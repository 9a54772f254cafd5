"""The backend pool: backends by model, aliases, the fixed external providers, and what a
replacement of the set (discovery, a reload) keeps and what it drops."""

from __future__ import annotations

import re

import pytest

from router.backends.pool import Backend, BackendPool, backend_id, parse_url
from router.config.settings import Config, StaticBackend
from router.discovery.static import static_backends
from router.stats.requests import RequestStats

from .conftest import make_flow

A = Backend("http://10.0.0.7:8000", ("llama", "llama-lora"))
B = Backend("http://10.0.0.8:8000", ("llama",))
C = Backend("http://10.0.0.9:8000", ("whisper",))
PROVIDER = Backend("https://api.openai.com", ("gpt-4o",), id="openai", kind="external",
                   headers={"Authorization": "Bearer sk-secret"})


# --------------------------------------------------------------------------- one backend


def test_a_backends_id_comes_from_its_url_alone() -> None:
    again = Backend("http://10.0.0.7:8000/", ("other",), labels=("prefill",))
    assert again.url == A.url == "http://10.0.0.7:8000"
    assert again.id == A.id == backend_id(A.url)
    assert len({A.id, B.id, C.id}) == 3
    assert PROVIDER.id == "openai"  # given ids are kept


def test_backend_repr_shows_id_kind_url_and_models_but_no_headers() -> None:
    assert repr(A) == f"<Backend {A.id} http://10.0.0.7:8000 models=['llama', 'llama-lora']>"
    assert repr(PROVIDER) == "<Backend openai external https://api.openai.com models=['gpt-4o']>"


def test_serves_names_only_the_backends_own_models() -> None:
    assert A.serves("llama-lora") and not B.serves("llama-lora") and not A.serves("whisper")


# --------------------------------------------------------------------------- the pool


def test_candidates_are_the_backends_serving_a_model_in_pool_order() -> None:
    pool = BackendPool([A, B, C])
    assert pool.candidates("llama") == (A, B)
    assert pool.candidates("llama-lora") == (A,)
    assert pool.candidates("unknown") == ()
    assert pool.models() == ["llama", "llama-lora", "whisper"]


def test_resolve_follows_an_alias_and_passes_other_names_through() -> None:
    pool = BackendPool([A], aliases={"gpt-4o": "llama"})
    assert pool.resolve("gpt-4o") == "llama"
    assert pool.resolve("llama") == "llama"
    assert pool.resolve("unknown") == "unknown"


def test_routable_aliases_are_those_of_served_models_sorted_by_alias() -> None:
    pool = BackendPool([A, B], aliases={"gpt-4o": "llama", "fast": "llama-lora",
                                        "whisper-1": "whisper"})
    assert list(pool.routable_aliases().items()) == [("fast", "llama-lora"), ("gpt-4o", "llama")]
    pool.replace([B])
    assert pool.routable_aliases() == {"gpt-4o": "llama"}
    pool.replace([C])
    assert pool.routable_aliases() == {"whisper-1": "whisper"}


def test_replace_swaps_the_set_and_lookups_see_it_at_once() -> None:
    pool = BackendPool([A, B])
    pool.replace([C])
    assert pool.backends == (C,)
    assert pool.candidates("llama") == ()
    assert pool.candidates("whisper") == (C,)
    assert pool.models() == ["whisper"]


def test_fixed_backends_stay_whatever_discovery_puts_in_the_set() -> None:
    pool = BackendPool([A], fixed=[PROVIDER])
    assert pool.backends == (A, PROVIDER)
    pool.replace([])
    assert pool.backends == (PROVIDER,)
    assert pool.candidates("gpt-4o") == (PROVIDER,)
    pool.replace([B, C])
    assert pool.backends == (B, C, PROVIDER)


def test_removal_listeners_hear_only_the_ids_that_left() -> None:
    pool = BackendPool([A, B], fixed=[PROVIDER])
    heard: list[frozenset[str]] = []
    pool.on_removed(heard.append)
    # A comes back as a new object with other models (a reload, a LoRA adapter): it stays.
    pool.replace([Backend(A.url, ("llama",)), C])
    assert heard == [frozenset({B.id})]
    pool.replace([Backend(A.url, ("llama",)), C])
    assert heard == [frozenset({B.id})]  # nothing left: no call
    pool.replace([])
    assert heard == [frozenset({B.id}), frozenset({A.id, C.id})]  # never the fixed provider


def test_a_reload_keeps_the_in_flight_counts_of_the_backends_it_keeps() -> None:
    def config(*urls: str) -> Config:
        return Config(static_backends=tuple(StaticBackend(url, ("llama",)) for url in urls))

    stats = RequestStats(window=60.0)
    pool = BackendPool(static_backends(config(A.url, B.url)))
    kept, leaving = pool.backends
    flows = [make_flow(kept), make_flow(kept), make_flow(leaving)]
    for flow in flows:
        stats.on_new(flow)
    # The reload builds new Backend objects; the one at the same URL is the same backend.
    pool.replace(static_backends(config(A.url, C.url)))
    assert [backend.url for backend in pool.backends] == [A.url, C.url]
    assert pool.backends[0] is not kept
    assert stats.for_backend(pool.backends[0].id).in_flight == 2
    assert stats.for_backend(pool.backends[1].id).in_flight == 0
    stats.on_complete(flows[0])
    assert stats.for_backend(pool.backends[0].id).in_flight == 1


def test_pool_repr_shows_its_size_and_models() -> None:
    pool = BackendPool([A, C], fixed=[PROVIDER])
    assert repr(pool) == "<BackendPool backends=3 models=['gpt-4o', 'llama', 'llama-lora', " \
                         "'whisper']>"


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(("url", "normalised"), [
    ("http://10.0.0.7:8000/", "http://10.0.0.7:8000"),
    ("https://engine.example/v1/prefix/", "https://engine.example/v1/prefix"),
    ("HTTP://Engine.Example:80", "http://engine.example"),
])
def test_parse_url_normalises_a_backend_url(url: str, normalised: str) -> None:
    assert parse_url(url) == normalised


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://10.0.0.7", "not an http(s) URL with a host: 'ftp://10.0.0.7'"),
    ("http://", "not an http(s) URL with a host: 'http://'"),
    ("10.0.0.7:8000", "not an http(s) URL with a host"),
    ("http://10.0.0.7:8000/?a=1", "a backend URL has no query, fragment or credentials"),
    ("http://10.0.0.7:8000/#top", "a backend URL has no query, fragment or credentials"),
    ("http://user:pw@10.0.0.7:8000", "a backend URL has no query, fragment or credentials"),
])
def test_parse_url_refuses_what_would_end_up_in_the_wrong_place(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_url(url)
