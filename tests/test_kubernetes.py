"""Kubernetes discovery against an API server stand-in (tests/k8s_stand_in.py) on loopback,
with fake vLLM engines as the pods' and services' targets.

Every pod has IP 127.0.0.1; its engine port comes from the `router.vllm.ai/port` annotation,
the per-pod override a real fleet can use too (so no test depends on `--k8s-port` alone).

Services (`--k8s-service-discovery-type service-name`) are reached by name: in the router's own
namespace at `http://NAME:PORT`, as the pod's DNS search path resolves it. The one name that
resolves to loopback here without a cluster DNS is `localhost`, so the service-mode tests route
through a service named `localhost`: real name resolution, no stand-in resolver."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from router.backends.pool import BackendPool
from router.config.load import parse_config
from router.config.settings import K8sSettings
from router.discovery import kubernetes  # for monkeypatching its constants
from router.discovery.k8s_access import (
    K8sAccess,
    K8sConfigError,
    in_cluster_api_server,
    load_access,
)
from router.discovery.k8s_targets import LABELS_ANNOTATION
from router.discovery.kubernetes import KubernetesDiscovery, kubernetes_discovery
from router.testing import KvEventsOptions, RunningEngine, start_engine
from router.testing.flood import start_flood
from router.testing.processes import free_port, wait_until_healthy
from tests.k8s_stand_in import ApiServerStandIn, Pod, make_pod, make_service, set_ready
from tests.conftest import eventually

NAMESPACE = "llm"
SELECTOR = "app=vllm"
LLAMA = ("llama-3-8b",)
QWEN = ("qwen-7b", "qwen-7b-sql-lora")


def settings(**overrides: Any) -> K8sSettings:
    """Settings for tests: quick retries; models refreshed only when a test asks."""
    values: dict[str, Any] = dict(
        namespace=NAMESPACE, label_selector=SELECTOR, port=1, models_refresh=60.0,
        model_fetch_timeout=2.0, request_timeout=5.0, retry_min=0.02, retry_max=0.2,
    )
    values.update(overrides)
    return K8sSettings(**values)


def routed(pool: BackendPool) -> dict[str, tuple[str, ...]]:
    return {backend.url: backend.models for backend in pool.backends}


def port_of(engine: RunningEngine) -> int:
    port = URL(engine.url).port
    assert port is not None
    return port


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "router.k8s" and r.levelno >= level]


@pytest.fixture(autouse=True)
def k8s_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="router.k8s")


@pytest.fixture
async def api() -> AsyncIterator[ApiServerStandIn]:
    server = ApiServerStandIn(NAMESPACE)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def llama() -> AsyncIterator[RunningEngine]:
    async with await start_engine(LLAMA, name="llama") as engine:
        yield engine


@pytest.fixture
async def qwen() -> AsyncIterator[RunningEngine]:
    async with await start_engine(QWEN, name="qwen") as engine:
        yield engine


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


@dataclass
class Running:
    discovery: KubernetesDiscovery
    pool: BackendPool
    task: asyncio.Task[None]


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(session: aiohttp.ClientSession) -> AsyncIterator[Start]:
    running: list[Running] = []

    async def start(api: ApiServerStandIn, config: K8sSettings | None = None,
                    access: K8sAccess | None = None) -> Running:
        access = access or K8sAccess(server=api.url, namespace=NAMESPACE, token=api.token,
                                     home_namespace=NAMESPACE)
        pool = BackendPool()
        discovery = KubernetesDiscovery(pool, config or settings(), access, session)
        run = Running(discovery, pool, asyncio.create_task(discovery.run()))
        running.append(run)
        return run

    yield start
    for run in running:
        run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
        assert not run.discovery.targets.models.learning  # no model fetch outlives the discovery


# --------------------------------------------------------------------------- list and watch


async def test_initial_list_routes_ready_pods_with_the_models_their_engines_serve(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, qwen: RunningEngine,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama), annotations={LABELS_ANNOTATION: "prefill"}))
    api.add(make_pod("vllm-1", port=port_of(qwen), labels={"model": "decode"}))
    api.add(make_pod("vllm-2", port=free_port(), ready=False))
    api.add(make_pod("vllm-3", ip=None, phase="Pending"))
    api.add(make_pod("gateway", port=port_of(llama), labels={"app": "gateway"}))

    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 2)

    assert routed(run.pool) == {llama.url: LLAMA, qwen.url: QWEN}
    labels = {backend.url: backend.labels for backend in run.pool.backends}
    assert labels == {llama.url: ("prefill",), qwen.url: ("decode",)}
    assert [b.url for b in run.pool.candidates("qwen-7b-sql-lora")] == [qwen.url]
    [listed] = api.seen("list")
    assert listed.params["labelSelector"] == SELECTOR
    await eventually(lambda: api.open_watches == 1)
    [watch] = api.seen("watch")
    assert watch.params["resourceVersion"] == str(api.version)
    assert watch.params["allowWatchBookmarks"] == "true"
    assert int(watch.params["timeoutSeconds"]) > 0
    assert all(seen.authorization == "Bearer good-token" for seen in api.requests)


async def test_list_follows_continue_pages(
    api: ApiServerStandIn, start: Start, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kubernetes, "LIST_PAGE_SIZE", 2)
    for number in range(5):
        api.add(make_pod(f"vllm-{number}", ready=False))
    run = await start(api)
    await run.discovery.synced.wait()
    assert [seen.params.get("continue") for seen in api.seen("list")] == [None, "2", "4"]
    assert "pods=5 routable=0" in repr(run.discovery)
    assert run.discovery.resource_version == str(api.version)


def _not_ready(pod: Pod) -> None:
    set_ready(pod, False)


def _no_ip(pod: Pod) -> None:
    del pod["status"]["podIP"]


def _terminating(pod: Pod) -> None:
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:05:00Z"


def _failed(pod: Pod) -> None:
    pod["status"]["phase"] = "Failed"


def _relabelled(pod: Pod) -> None:
    pod["metadata"]["labels"]["app"] = "retired"


REMOVALS: dict[str, Callable[[ApiServerStandIn], None]] = {
    "not_ready": lambda api: api.change("vllm-0", _not_ready),
    "ip_lost": lambda api: api.change("vllm-0", _no_ip),
    "terminating": lambda api: api.change("vllm-0", _terminating),
    "failed": lambda api: api.change("vllm-0", _failed),
    "relabelled": lambda api: api.change("vllm-0", _relabelled),
    "deleted": lambda api: api.delete("vllm-0"),
}


@pytest.mark.parametrize("how", sorted(REMOVALS))
async def test_pod_is_removed_at_once_when(
    how: str, api: ApiServerStandIn, start: Start, llama: RunningEngine, qwen: RunningEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    api.add(make_pod("vllm-1", port=port_of(qwen)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 2)

    REMOVALS[how](api)
    # The watch event alone does it: no re-list, no model refresh (that is 60 s away).
    await eventually(lambda: llama.url not in routed(run.pool), timeout=1.0)

    assert routed(run.pool) == {qwen.url: QWEN}
    assert len(api.seen("list")) == 1
    assert f"backend {llama.url} removed (pod vllm-0)" in messages(caplog)


async def test_pod_that_turns_ready_is_routed_once_its_engine_lists_its_models(
    api: ApiServerStandIn, start: Start, caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api.add(make_pod("vllm-0", port=port, ready=False))
    run = await start(api, settings(models_refresh=0.2))
    await run.discovery.synced.wait()

    api.change("vllm-0", lambda pod: set_ready(pod, True))
    await eventually(lambda: any("not routed until it answers" in m for m in messages(caplog)))
    assert run.pool.backends == ()  # Ready, but nothing answers /v1/models yet

    async with await start_engine(("late-model",), port=port):
        await eventually(lambda: routed(run.pool) == {url: ("late-model",)})


async def test_models_are_refreshed_so_new_lora_adapters_are_routed(
    api: ApiServerStandIn, start: Start,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = await start_engine(("base",), port=port)
    try:
        api.add(make_pod("vllm-0", port=port))
        run = await start(api, settings(models_refresh=0.1))
        await eventually(lambda: routed(run.pool) == {url: ("base",)})
        backend_id = run.pool.backends[0].id

        # The engine restarts with an adapter loaded; while it is away, the models stay.
        await engine.close()
        await asyncio.sleep(0.25)
        assert routed(run.pool) == {url: ("base",)}
        engine = await start_engine(("base", "base-sql-lora"), port=port)
        await eventually(lambda: routed(run.pool) == {url: ("base", "base-sql-lora")})
        assert run.pool.backends[0].id == backend_id
    finally:
        await engine.close()


@pytest.mark.parametrize("gone_as", ["error_event", "http_status"])
async def test_410_after_a_watch_gap_relists_and_drops_the_pod_whose_deletion_was_missed(
    gone_as: str, api: ApiServerStandIn, start: Start, llama: RunningEngine,
    qwen: RunningEngine, caplog: pytest.LogCaptureFixture,
) -> None:
    """A missed DELETED must not keep a dead pod routed."""
    api.gone_as_http_status = gone_as == "http_status"
    api.add(make_pod("vllm-0", port=port_of(llama)))
    api.add(make_pod("vllm-1", port=port_of(qwen)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 2 and api.open_watches == 1)

    api.watch_gate.clear()  # the next watch waits...
    api.end_watches()
    await eventually(lambda: api.open_watches == 0)
    api.delete("vllm-1")  # ...while the pod goes,
    api.compact()  # and the history that held its DELETED is compacted away.
    await asyncio.sleep(0.1)
    assert qwen.url in routed(run.pool)  # nothing has told discovery yet
    api.watch_gate.set()

    await eventually(lambda: qwen.url not in routed(run.pool))
    assert routed(run.pool) == {llama.url: LLAMA}
    assert len(api.seen("list")) == 2
    statuses = [seen.status for seen in api.seen("watch")]
    assert statuses[:2] == [200, 410 if gone_as == "http_status" else 200]
    await eventually(lambda: api.open_watches == 1)
    assert api.seen("watch")[-1].params["resourceVersion"] == str(api.version)
    assert any("too old" in m for m in messages(caplog))
    assert "pod vllm-1 is gone (not in the new pod list)" in messages(caplog)


async def test_new_pod_on_a_reused_address_is_asked_for_its_models(
    api: ApiServerStandIn, start: Start,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = await start_engine(("old-model",), port=port)
    try:
        api.add(make_pod("vllm-old", port=port))
        run = await start(api)
        await eventually(lambda: routed(run.pool) == {url: ("old-model",)}
                         and api.open_watches == 1)

        # During a watch gap the pod is replaced by another that got the same IP and port.
        api.watch_gate.clear()
        api.end_watches()
        await eventually(lambda: api.open_watches == 0)
        api.delete("vllm-old")
        await engine.close()
        engine = await start_engine(("new-model",), port=port)
        api.add(make_pod("vllm-new", port=port))
        api.compact()
        api.watch_gate.set()

        # Models come from the new pod's engine now, not in a refresh 60 s later.
        await eventually(lambda: routed(run.pool) == {url: ("new-model",)})
    finally:
        await engine.close()


async def test_410_error_event_on_an_open_watch_relists(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, qwen: RunningEngine,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    api.add(make_pod("vllm-1", port=port_of(qwen)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 2 and api.open_watches == 1)

    api.delete("vllm-1", deliver=False)  # an event lost on the way
    await asyncio.sleep(0.1)
    assert qwen.url in routed(run.pool)
    api.expire_watches()

    await eventually(lambda: qwen.url not in routed(run.pool))
    assert len(api.seen("list")) == 2


async def test_broken_watch_relists_and_watches_again(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, qwen: RunningEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    api.break_watches()  # half an event, then the connection drops
    await eventually(lambda: len(api.seen("list")) == 2 and api.open_watches == 1)
    api.add(make_pod("vllm-1", port=port_of(qwen)))  # seen by the new watch

    await eventually(lambda: routed(run.pool) == {llama.url: LLAMA, qwen.url: QWEN})
    assert any("the pod watch broke" in m for m in messages(caplog, logging.WARNING))


async def test_watch_ended_by_the_server_resumes_from_the_last_resource_version(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, qwen: RunningEngine,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api)
    await eventually(lambda: api.open_watches == 1)
    api.add(make_pod("vllm-1", port=port_of(qwen)))
    await eventually(lambda: len(run.pool.backends) == 2)
    version = run.discovery.resource_version
    assert version == str(api.version)

    api.end_watches()  # as when timeoutSeconds runs out
    await eventually(lambda: len(api.seen("watch")) == 2 and api.open_watches == 1)

    assert api.seen("watch")[-1].params["resourceVersion"] == version
    assert len(api.seen("list")) == 1
    assert len(run.pool.backends) == 2


async def test_bookmark_moves_the_resource_version_so_a_resume_needs_no_relist(
    api: ApiServerStandIn, start: Start, llama: RunningEngine,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    for _ in range(5):
        api.bump()  # changes to pods the selector does not match
    api.bookmark()
    await eventually(lambda: run.discovery.resource_version == str(api.version))
    api.compact()  # without the bookmark, a resume would now get 410 and a re-list
    api.end_watches()

    await eventually(lambda: len(api.seen("watch")) == 2 and api.open_watches == 1)
    assert api.seen("watch")[-1].params["resourceVersion"] == str(api.version)
    assert len(api.seen("list")) == 1
    assert routed(run.pool) == {llama.url: LLAMA}


async def test_bad_events_are_skipped_and_an_undecodable_one_relists(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, qwen: RunningEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    api.inject(b'{"type":"ADDED","object":"not a pod"}')
    api.inject(b'{"type":"SURPRISE","object":{"metadata":{"name":"x"}}}')
    api.inject(b'{"type":"ADDED","object":{"metadata":{"labels":{}}}}')
    api.inject(b'{"type":"MODIFIED","object":{"metadata":{"name":"odd"},"status":[1]}}')
    api.inject(b"[]")
    api.add(make_pod("vllm-1", port=port_of(qwen)))
    await eventually(lambda: len(run.pool.backends) == 2)
    assert len(api.seen("list")) == 1  # skipped, the watch went on
    warnings = messages(caplog, logging.WARNING)
    assert any("unknown type 'SURPRISE'" in m for m in warnings)
    assert any("without metadata.name" in m for m in warnings)

    api.inject(b'{"type":"MODIFIED","obj')  # a line that cannot be decoded: events may be lost
    await eventually(lambda: len(api.seen("list")) == 2 and api.open_watches == 1)
    assert routed(run.pool) == {llama.url: LLAMA, qwen.url: QWEN}
    assert not run.task.done()


async def test_api_server_gone_keeps_the_last_known_backends(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, caplog: pytest.LogCaptureFixture,
) -> None:
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api)
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    await api.close()
    await eventually(lambda: any("cannot reach the kubernetes API" in m
                                 for m in messages(caplog, logging.WARNING)))
    assert routed(run.pool) == {llama.url: LLAMA}
    assert not run.task.done()


# --------------------------------------------------------------------------- service-name


SERVICE = "localhost"
"""A service name that resolves to 127.0.0.1 here (see the module docstring)."""


def services(**overrides: Any) -> K8sSettings:
    return settings(discovery_type="service-name", **overrides)


async def test_service_that_appears_is_routed_by_name_and_leaves_when_deleted(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, caplog: pytest.LogCaptureFixture,
) -> None:
    port = port_of(llama)
    url = f"http://localhost:{port}"
    api.add(make_pod("vllm-0", port=port))  # pods are not what this mode watches
    api.add(make_service("gateway", port=port, labels={"app": "gateway"}), resource="services")
    run = await start(api, services())
    await eventually(lambda: api.open_watches == 1)
    assert run.pool.backends == ()

    api.add(make_service(SERVICE, port=port), resource="services")
    await eventually(lambda: routed(run.pool) == {url: LLAMA})
    assert "services=1 routable=1 backends=1" in repr(run.discovery)
    [listed] = api.seen("list")
    [watch] = api.seen("watch")
    assert (listed.resource, watch.resource) == ("services", "services")
    assert listed.params["labelSelector"] == watch.params["labelSelector"] == SELECTOR
    assert watch.params["allowWatchBookmarks"] == "true"

    api.delete(SERVICE, resource="services")
    await eventually(lambda: run.pool.backends == (), timeout=1.0)
    assert f"backend {url} removed (service localhost)" in messages(caplog)
    assert len(api.seen("list")) == 1


@pytest.mark.parametrize("gone_as", ["error_event", "http_status"])
async def test_410_relists_services_and_drops_the_one_whose_deletion_was_missed(
    gone_as: str, api: ApiServerStandIn, start: Start, llama: RunningEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api.gone_as_http_status = gone_as == "http_status"
    api.add(make_service(SERVICE, port=port_of(llama)), resource="services")
    run = await start(api, services())
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    api.watch_gate.clear()
    api.end_watches()
    await eventually(lambda: api.open_watches == 0)
    api.delete(SERVICE, resource="services")
    api.compact()  # the DELETED event is gone from the history the next watch would replay
    await asyncio.sleep(0.1)
    assert len(run.pool.backends) == 1
    api.watch_gate.set()

    await eventually(lambda: run.pool.backends == ())
    assert len(api.seen("list", "services")) == 2
    statuses = [seen.status for seen in api.seen("watch", "services")]
    assert statuses[:2] == [200, 410 if gone_as == "http_status" else 200]
    assert api.seen("list", "pods") == api.seen("watch", "pods") == []
    assert "service localhost is gone (not in the new service list)" in messages(caplog)
    await eventually(lambda: api.open_watches == 1)


async def test_service_watch_resumes_from_a_bookmark_without_a_relist(
    api: ApiServerStandIn, start: Start, llama: RunningEngine,
) -> None:
    api.add(make_service(SERVICE, port=port_of(llama)), resource="services")
    run = await start(api, services())
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    for _ in range(3):
        api.bump()
    api.bookmark()
    await eventually(lambda: run.discovery.resource_version == str(api.version))
    api.compact()
    api.end_watches()

    await eventually(lambda: len(api.seen("watch")) == 2 and api.open_watches == 1)
    assert api.seen("watch")[-1].params["resourceVersion"] == str(api.version)
    assert len(api.seen("list")) == 1


async def test_services_outside_the_router_s_namespace_get_qualified_names(
    api: ApiServerStandIn, session: aiohttp.ClientSession,
) -> None:
    def engine_urls(config: K8sSettings, home: str | None) -> str:
        access = K8sAccess(server=api.url, namespace=NAMESPACE, home_namespace=home)
        return KubernetesDiscovery(BackendPool(), config, access, session).engine_urls

    assert engine_urls(services(), NAMESPACE) == "http://NAME:PORT"
    assert engine_urls(services(), "router") == "http://NAME.llm.svc:PORT"
    assert engine_urls(services(), None) == "http://NAME.llm.svc:PORT"
    assert engine_urls(settings(port=8000), "router") == "http://POD_IP:8000"


def test_pod_ip_is_the_default_discovery_type() -> None:
    flags = ["--service-discovery", "k8s", "--k8s-kubeconfig", "/nowhere"]
    default = parse_config(flags).k8s
    assert default is not None and default.discovery_type == "pod-ip"
    chosen = parse_config([*flags, "--k8s-service-discovery-type", "service-name"]).k8s
    assert chosen is not None and chosen.discovery_type == "service-name"
    with pytest.raises(SystemExit):
        parse_config([*flags, "--k8s-service-discovery-type", "endpoints"])


# --------------------------------------------------------------------------- the real router


@asynccontextmanager
async def router_process(api: ApiServerStandIn, tmp_path: Path,
                         *flags: str) -> AsyncIterator[str]:
    """`python -m router` with Kubernetes discovery through a kubeconfig naming the stand-in."""
    kubeconfig = tmp_path / "kubeconfig.json"
    kubeconfig.write_text(json.dumps(_kubeconfig(api.url, {"token": "good-token"})))
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("KUBERNETES_") and key != "KUBECONFIG"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "router.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
            "--service-discovery", "k8s", "--k8s-kubeconfig", str(kubeconfig),
            "--k8s-label-selector", SELECTOR, "--no-access-log", *flags,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=environ,
        )
    try:
        async with aiohttp.ClientSession() as client:
            await wait_until_healthy(client, url, process)
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


async def backends(client: aiohttp.ClientSession, url: str) -> list[str]:
    async with client.get(url + "/engines") as response:
        assert response.status == 200
        listing = await response.json()
    return sorted(engine["url"] for engine in listing)


async def _lists(client: aiohttp.ClientSession, url: str, expected: list[str]) -> bool:
    return await backends(client, url) == expected


async def chat(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.post(url + "/v1/chat/completions", json={
        "model": LLAMA[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
    }) as response:
        return response.status, await response.json()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


MODES = {
    # flags, the resource watched, the object that makes `engine` a backend and its host
    "pod-ip-by-default": ((), "pods", lambda port: make_pod("vllm-0", port=port), "127.0.0.1"),
    "service-name": (("--k8s-service-discovery-type", "service-name"), "services",
                     lambda port: make_service(SERVICE, port=port), "localhost"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_router_routes_chat_to_what_it_discovers_and_drops_it_on_delete_and_on_410(
    mode: str, api: ApiServerStandIn, llama: RunningEngine, tmp_path: Path,
) -> None:
    flags, resource, make, host = MODES[mode]
    port = port_of(llama)
    engine = f"http://{host}:{port}"
    async with router_process(api, tmp_path, *flags) as url, \
            aiohttp.ClientSession() as client:
        await eventually(lambda: api.open_watches == 1, timeout=10.0)

        # It appears while the router watches: a real chat request reaches its engine.
        obj = make(port)
        name = obj["metadata"]["name"]
        api.add(obj, resource=resource)
        await until(lambda: _lists(client, url, [engine]))
        status, reply = await chat(client, url)
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"]
        assert llama.state.completed == 1
        assert llama.state.last_headers is not None
        assert llama.state.last_headers["Host"] == f"{host}:{port}"

        # Deleted: it leaves the pool, and the model with it.
        api.delete(name, resource=resource)
        await until(lambda: _lists(client, url, []))
        status, reply = await chat(client, url)
        assert status == 404, reply

        # Back, then deleted while the event is lost; the 410 that follows makes the router
        # list again, and the list no longer holds it.
        api.add(make(port), resource=resource)
        await until(lambda: _lists(client, url, [engine]))
        api.delete(name, deliver=False, resource=resource)
        await asyncio.sleep(0.1)
        assert await backends(client, url) == [engine]
        api.expire_watches()
        await until(lambda: _lists(client, url, []))

    assert len(api.seen("list")) == 2
    assert {seen.resource for seen in api.requests} == {resource}


# --------------------------------------------------------------------------- backoff


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


@pytest.mark.parametrize("failure", ["always_gone", "list_error", "bad_token", "watch_ends"])
async def test_failures_back_off_instead_of_looping_hot(
    failure: str, api: ApiServerStandIn, start: Start,
) -> None:
    access = None
    if failure == "always_gone":
        api.always_gone = True
    elif failure == "list_error":
        api.list_status = 500
    elif failure == "bad_token":
        access = K8sAccess(server=api.url, namespace=NAMESPACE, token="wrong")
    else:
        api.end_watches_at_once = True
    run = await start(api, settings(retry_min=0.05, retry_max=0.2), access)
    await asyncio.sleep(1.2)
    run.task.cancel()

    kind = "watch" if failure == "watch_ends" else "list"
    times = [seen.at for seen in api.seen(kind)]
    # Backoff from 0.05 s doubling to 0.2 s (with jitter) allows about ten in 1.2 s.
    assert 3 <= len(times) <= 16, len(times)
    gaps = _gaps(times)
    assert max(gaps[-3:]) > 2 * min(gaps[:2]), gaps


async def test_bad_token_is_logged_clearly_and_a_rotated_token_file_heals_it(
    tmp_path: Path, api: ApiServerStandIn, start: Start, llama: RunningEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("expired-token\n")
    (account / "namespace").write_text(NAMESPACE)
    config = settings(namespace=None, api_server=api.url, service_account_dir=str(account),
                      token_reload=3600.0)
    access = await load_access(config)
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api, config, access)

    await eventually(lambda: len(api.seen("list")) >= 3)
    errors = messages(caplog, logging.ERROR)
    assert errors and all("HTTP 401" in m and "check the token" in m for m in errors)
    assert "the service account in" in errors[0]
    assert run.pool.backends == ()

    (account / "token").write_text("good-token\n")  # kubelet rotated the token
    # A 401 makes the next request read the file again, long before token_reload.
    await eventually(lambda: llama.url in routed(run.pool))
    assert api.seen("list")[-1].authorization == "Bearer good-token"
    assert "the kubernetes API answers again" in messages(caplog)


async def test_rotated_token_file_is_read_again_before_it_fails(
    tmp_path: Path, api: ApiServerStandIn, start: Start, llama: RunningEngine,
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("good-token")
    config = settings(namespace=None, api_server=api.url, service_account_dir=str(account),
                      token_reload=0.05)
    access = await load_access(config)
    assert access.namespace == "default"  # no namespace file, no setting
    access = K8sAccess(server=access.server, namespace=NAMESPACE, token=access.token,
                       token_file=access.token_file, source=access.source)
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api, config, access)
    await eventually(lambda: len(run.pool.backends) == 1 and api.open_watches == 1)

    (account / "token").write_text("rotated-token")
    api.token = "rotated-token"
    await asyncio.sleep(0.1)
    api.end_watches()

    await eventually(lambda: len(api.seen("watch")) == 2 and api.open_watches == 1)
    assert api.seen("watch")[-1].authorization == "Bearer rotated-token"
    assert all(seen.status != 401 for seen in api.requests)


# --------------------------------------------------------------------------- the app's owner


def _kubeconfig(server: str, user: dict[str, Any], cluster: dict[str, Any] | None = None,
                namespace: str | None = NAMESPACE) -> dict[str, Any]:
    context: dict[str, Any] = {"cluster": "stand-in", "user": "router"}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": server, **(cluster or {})}}],
        "contexts": [{"name": "stand-in", "context": context},
                     {"name": "elsewhere", "context": {"cluster": "stand-in", "user": "router",
                                                       "namespace": "elsewhere"}}],
        "users": [{"name": "router", "user": user}],
    }


async def test_cleanup_ctx_runs_discovery_while_the_app_runs(
    tmp_path: Path, api: ApiServerStandIn, llama: RunningEngine,
) -> None:
    path = tmp_path / "kubeconfig.json"
    path.write_text(json.dumps(_kubeconfig(api.url, {"token": "good-token"})))
    api.add(make_pod("vllm-0", port=port_of(llama)))
    pool = BackendPool()
    app = web.Application()
    config = settings(namespace=None, kubeconfig=str(path))
    app.cleanup_ctx.append(kubernetes_discovery(pool, config))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await eventually(lambda: routed(pool) == {llama.url: LLAMA})
    finally:
        await runner.cleanup()
    assert not [task for task in asyncio.all_tasks()
                if task.get_name() in ("kubernetes-discovery", "k8s-models-refresh")]


async def test_cleanup_ctx_stops_the_start_on_missing_credentials() -> None:
    app = web.Application()
    app.cleanup_ctx.append(kubernetes_discovery(BackendPool(), K8sSettings()))
    runner = web.AppRunner(app)
    with pytest.raises(K8sConfigError, match="not running in a pod"):
        await runner.setup()
    await runner.cleanup()


# --------------------------------------------------------------------------- credentials


def test_in_cluster_api_server_comes_from_the_pod_environment() -> None:
    assert in_cluster_api_server({}) is None
    assert in_cluster_api_server({"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                  "KUBERNETES_SERVICE_PORT": "6443"}) == "https://10.96.0.1:6443"
    assert in_cluster_api_server({"KUBERNETES_SERVICE_HOST": "fd00::1"}) == "https://[fd00::1]:443"


async def test_in_cluster_without_a_token_is_a_clear_error(tmp_path: Path) -> None:
    config = K8sSettings(api_server="https://10.96.0.1:443", service_account_dir=str(tmp_path))
    with pytest.raises(K8sConfigError, match=r"cannot read the service-account token .*token"):
        await load_access(config)


async def test_in_cluster_https_without_a_ca_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    config = K8sSettings(api_server="https://10.96.0.1:443", service_account_dir=str(tmp_path))
    with pytest.raises(K8sConfigError, match=r"cannot load the service-account CA .*ca\.crt"):
        await load_access(config)


async def test_kubeconfig_json_gives_server_token_and_context_namespace(
    tmp_path: Path, api: ApiServerStandIn,
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_kubeconfig(api.url + "/", {"token": "good-token"})))
    access = await load_access(K8sSettings(kubeconfig=str(path)))
    assert (access.server, access.namespace, access.token) == (api.url, NAMESPACE, "good-token")
    other = await load_access(K8sSettings(kubeconfig=str(path), context="elsewhere"))
    assert other.namespace == "elsewhere"
    chosen = await load_access(K8sSettings(kubeconfig=str(path), namespace="mine"))
    assert chosen.namespace == "mine"


async def test_the_router_s_own_namespace_is_the_service_account_s_or_the_context_s(
    tmp_path: Path, api: ApiServerStandIn,
) -> None:
    """Where short service names resolve: `service-name` discovery qualifies the others."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("good-token")
    (account / "namespace").write_text("router\n")
    in_cluster = await load_access(K8sSettings(api_server=api.url, namespace=NAMESPACE,
                                               service_account_dir=str(account)))
    assert (in_cluster.namespace, in_cluster.home_namespace) == (NAMESPACE, "router")
    (account / "namespace").unlink()
    unknown = await load_access(K8sSettings(api_server=api.url,
                                            service_account_dir=str(account)))
    assert (unknown.namespace, unknown.home_namespace) == ("default", None)

    path = tmp_path / "config.json"
    path.write_text(json.dumps(_kubeconfig(api.url, {"token": "good-token"})))
    chosen = await load_access(K8sSettings(kubeconfig=str(path), namespace="other"))
    assert (chosen.namespace, chosen.home_namespace) == ("other", NAMESPACE)
    path.write_text(json.dumps(_kubeconfig(api.url, {"token": "good-token"}, namespace=None)))
    bare = await load_access(K8sSettings(kubeconfig=str(path)))
    assert (bare.namespace, bare.home_namespace) == ("default", "default")


async def test_kubeconfig_token_file_is_relative_to_the_kubeconfig(
    tmp_path: Path, api: ApiServerStandIn, start: Start, llama: RunningEngine,
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("good-token\n")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_kubeconfig(api.url, {"tokenFile": "secrets/token"})))
    config = settings(namespace=None, kubeconfig=str(path))
    access = await load_access(config)
    assert access.token == "good-token"
    assert access.token_file == str(tmp_path / "secrets" / "token")
    api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(api, config, access)
    await eventually(lambda: routed(run.pool) == {llama.url: LLAMA})


async def test_kubeconfig_in_yaml(tmp_path: Path, api: ApiServerStandIn) -> None:
    path = tmp_path / "config"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: dev\n"
        f"clusters:\n- name: c\n  cluster:\n    server: {api.url}\n"
        "contexts:\n- name: dev\n  context:\n    cluster: c\n    user: u\n    namespace: llm\n"
        "users:\n- name: u\n  user:\n    token: good-token\n"
    )
    access = await load_access(K8sSettings(kubeconfig=str(path)))
    assert (access.server, access.namespace, access.token) == (api.url, NAMESPACE, "good-token")


async def test_kubeconfig_that_is_not_a_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("clusters: [unclosed\n")
    with pytest.raises(K8sConfigError, match=r"kubeconfig .*config: not valid YAML"):
        await load_access(K8sSettings(kubeconfig=str(path)))
    path.write_text("- just\n- a list\n")
    with pytest.raises(K8sConfigError, match="not a kubeconfig"):
        await load_access(K8sSettings(kubeconfig=str(path)))


@pytest.mark.parametrize(("user", "expected"), [
    ({"exec": {"command": "aws"}}, "exec plugin"),
    ({"auth-provider": {"name": "gcp"}}, "auth-provider plugin"),
    ({"username": "admin", "password": "x"}, "basic authentication"),
    ({"client-certificate-data": "Zm9v"}, "needs both the certificate and the key"),
])
async def test_kubeconfig_credentials_the_router_cannot_use_are_refused_clearly(
    tmp_path: Path, user: dict[str, Any], expected: str,
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_kubeconfig("https://127.0.0.1:6443", user)))
    with pytest.raises(K8sConfigError, match=expected):
        await load_access(K8sSettings(kubeconfig=str(path)))


async def test_kubeconfig_errors_name_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_kubeconfig("https://127.0.0.1:6443", {"token": "t"})))
    with pytest.raises(K8sConfigError, match="no entry named 'nope' in 'contexts'"):
        await load_access(K8sSettings(kubeconfig=str(path), context="nope"))
    with pytest.raises(K8sConfigError, match="cannot read kubeconfig"):
        await load_access(K8sSettings(kubeconfig=str(tmp_path / "absent")))
    with pytest.raises(K8sConfigError, match="no current-context"):
        path.write_text(json.dumps({"clusters": []}))
        await load_access(K8sSettings(kubeconfig=str(path)))


async def test_no_cluster_and_no_kubeconfig_is_a_clear_error() -> None:
    with pytest.raises(K8sConfigError, match="KUBERNETES_SERVICE_HOST is not set"):
        await load_access(K8sSettings())


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    where = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=stand-in-ca")
    for name, usage in (("server", "serverAuth\nsubjectAltName=IP:127.0.0.1"),
                        ("client", "clientAuth")):
        (where / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
            f"authorityKeyIdentifier=keyid\nextendedKeyUsage={usage}\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=router-{name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                "-extfile", f"{name}.ext")
    return where


def _server_context(pki: Path, client_certificates: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    if client_certificates:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki / "ca.crt")
    return context


@pytest.fixture
async def tls_api(pki: Path) -> AsyncIterator[ApiServerStandIn]:
    server = ApiServerStandIn(NAMESPACE, ssl_context=_server_context(pki, False))
    await server.start()
    yield server
    await server.close()


async def test_in_cluster_service_account_over_tls(
    tmp_path: Path, pki: Path, tls_api: ApiServerStandIn, start: Start, llama: RunningEngine,
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("good-token")
    (account / "namespace").write_text(NAMESPACE + "\n")
    shutil.copy(pki / "ca.crt", account / "ca.crt")
    port = URL(tls_api.url).port
    config = settings(namespace=None, service_account_dir=str(account),
                      api_server=in_cluster_api_server({"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                                        "KUBERNETES_SERVICE_PORT": str(port)}))
    access = await load_access(config)
    assert access.namespace == NAMESPACE and isinstance(access.ssl, ssl.SSLContext)

    tls_api.add(make_pod("vllm-0", port=port_of(llama)))
    run = await start(tls_api, config, access)
    await eventually(lambda: routed(run.pool) == {llama.url: LLAMA})


async def test_kubeconfig_client_certificate_over_tls(
    tmp_path: Path, pki: Path, start: Start, llama: RunningEngine,
) -> None:
    api = ApiServerStandIn(NAMESPACE, token=None, ssl_context=_server_context(pki, True))
    await api.start()
    try:
        def data(name: str) -> str:
            return base64.b64encode((pki / name).read_bytes()).decode()

        path = tmp_path / "config.json"
        path.write_text(json.dumps(_kubeconfig(
            api.url,
            {"client-certificate-data": data("client.crt"), "client-key-data": data("client.key")},
            {"certificate-authority-data": data("ca.crt")},
        )))
        config = settings(namespace=None, kubeconfig=str(path))
        access = await load_access(config)
        assert access.token is None
        api.add(make_pod("vllm-0", port=port_of(llama)))
        run = await start(api, config, access)
        await eventually(lambda: routed(run.pool) == {llama.url: LLAMA})
        assert not list(tmp_path.glob("router-k8s-*"))  # no key left on disk
    finally:
        await api.close()


async def test_untrusted_api_server_certificate_is_logged_and_retried(
    tmp_path: Path, tls_api: ApiServerStandIn, start: Start, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_kubeconfig(tls_api.url, {"token": "good-token"})))
    config = settings(namespace=None, kubeconfig=str(path))
    access = await load_access(config)  # no CA in the kubeconfig: the system's trust store
    await start(tls_api, config, access)
    await eventually(lambda: len(messages(caplog, logging.ERROR)) >= 2)
    assert all("cannot verify the kubernetes API server" in m
               for m in messages(caplog, logging.ERROR))
    assert tls_api.requests == []


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("field", "value"), [
    ("port", 0), ("port", 65536), ("scheme", "ftp"), ("namespace", " "), ("models_refresh", 0),
    ("model_fetch_timeout", float("inf")), ("watch_timeout", 0), ("retry_min", -1),
    ("discovery_type", "endpoints"),
])
def test_settings_refuse_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        K8sSettings(**{field: value})


# --------------------------------------------------------------------------- answer bounds


async def test_a_list_page_over_the_answer_limit_is_cut_and_listed_again_later(
    api: ApiServerStandIn, start: Start, caplog: pytest.LogCaptureFixture,
) -> None:
    for number in range(5):  # some 700 bytes a pod
        api.add(make_pod(f"vllm-{number}", ready=False))
    run = await start(api, settings(max_answer_size=2000))
    await eventually(lambda: len(api.seen("list")) >= 2)  # again, after a backoff
    assert not run.discovery.synced.is_set() and not run.task.done()
    warnings = messages(caplog, logging.WARNING)
    assert any("the kubernetes API answered more than 2000 bytes (--k8s-max-answer-size)"
               in message for message in warnings), warnings


async def test_an_engine_whose_models_answer_never_ends_is_not_routed(
    api: ApiServerStandIn, start: Start, llama: RunningEngine, caplog: pytest.LogCaptureFixture,
) -> None:
    async with await start_flood(["/v1/models"]) as flood:
        api.add(make_pod("vllm-0", port=port_of(llama)))
        api.add(make_pod("vllm-1", port=URL(flood.url).port))
        run = await start(api, settings(max_answer_size=1024 * 1024))
        await eventually(lambda: len(run.pool.backends) == 1 and flood.state.cut >= 1)
        assert routed(run.pool) == {llama.url: LLAMA}
        assert flood.state.bytes_sent < 16 * 1024 * 1024
        assert any("vllm-1 is routable but" in message and "answered more than 1048576 bytes"
                   in message for message in messages(caplog))


# --------------------------------------------------------------------------- kvaware


async def kv_blocks(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url + "/engines") as response:
        listing = await response.json()
    return sum((entry.get("kv_events") or {}).get("index_blocks", 0) for entry in listing)


async def test_kvaware_follows_the_kv_events_of_the_pods_it_discovers(
    api: ApiServerStandIn, tmp_path: Path,
) -> None:
    # The engine's /kv_event_sources names `tcp://*:PORT`: the router subscribes at the
    # pod's IP, learned from discovery alone.
    options = KvEventsOptions(block_size=16)
    async with await start_engine(LLAMA, name="llama-kv", kv_events=options) as engine:
        port = port_of(engine)
        async with router_process(api, tmp_path, "--routing-logic", "kvaware") as url, \
                aiohttp.ClientSession() as client:
            await eventually(lambda: api.open_watches == 1, timeout=10.0)
            api.add(make_pod("vllm-0", port=port))
            await until(lambda: _lists(client, url, [f"http://127.0.0.1:{port}"]))
            await engine.kv_events.publisher.wait_for_subscribers(timeout=10)
            body = {"model": LLAMA[0], "max_tokens": 3,
                    "messages": [{"role": "user", "content": "a question of some length " * 4}]}
            async with client.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
            await until(lambda: _positive(kv_blocks(client, url)), timeout=10)
            api.delete("vllm-0")  # it leaves the pool, and takes its blocks along
            await until(lambda: _lists(client, url, []))
            assert await kv_blocks(client, url) == 0


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0
