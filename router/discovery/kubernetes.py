"""Kubernetes discovery (`--service-discovery k8s`): the engine pods of one namespace that match a
label selector, found by listing and watching pods through the API server's REST API.

A pod is a backend while all of these hold: phase `Running`, condition `Ready` is `True`,
`status.podIP` is set, no `metadata.deletionTimestamp` (Terminating), and its engine has
answered `GET /v1/models` (so a pod whose model is still loading, or whose models are unknown, is
not routed). It leaves the pool at once on DELETED, NotReady, a lost IP or a deletion timestamp:
every change calls `BackendPool.replace` with the full current set.

Per pod, two annotations refine what the flags say:

- `router.vllm.ai/port: "8000"`: the engine port of this pod, instead of `--k8s-port`.
- `router.vllm.ai/labels: "prefill"`: the backend's labels (comma-separated), for the
  disaggregated-prefill policy. Without it, the pod label `model` is the one label, as in
  production-stack's router (label values cannot hold a list, hence an annotation).

How the pod set stays right (USER-ASKS 7, 8): LIST gives the full set and a `resourceVersion`;
WATCH from there streams ADDED / MODIFIED / DELETED / BOOKMARK / ERROR events, one JSON object
a line. A watch that the API server ends cleanly (`timeoutSeconds`) is resumed from the last
resourceVersion, which bookmarks keep fresh. Everything else lists again, because events may
have been lost: 410 Gone (the resourceVersion was compacted away, as an HTTP status or an ERROR
event), a broken connection, an undecodable line, any other ERROR. A re-list replaces the pod
set, so a pod whose DELETED event was missed goes too. Failures back off exponentially with
jitter; the first 410 re-lists at once. While the API server cannot be reached the last known
set keeps serving (the health prober still ejects dead engines).

Credentials: the pod's service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, and the token, CA
and namespace under `/var/run/secrets/kubernetes.io/serviceaccount`; the token is re-read every
minute and after a 401, since kubelet rotates it), or a kubeconfig (server, CA file or data,
token, tokenFile, client certificate and key; not exec or auth-provider plugins). Files are read
in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import math
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml
from aiohttp import web

from router import __version__
from router.backends import Backend, BackendPool

__all__ = [
    "K8sSettings",
    "K8sAccess",
    "K8sConfigError",
    "KubernetesDiscovery",
    "PodTarget",
    "pod_target",
    "pod_labels",
    "parse_kubeconfig",
    "in_cluster_api_server",
    "load_access",
    "read_access",
    "kubernetes_discovery",
    "SERVICE_ACCOUNT_DIR",
    "PORT_ANNOTATION",
    "LABELS_ANNOTATION",
    "MODEL_LABEL",
]

log = logging.getLogger("router.k8s")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PORT_ANNOTATION = "router.vllm.ai/port"
"""Pod annotation: the engine port of this pod, overriding `K8sSettings.port`."""
LABELS_ANNOTATION = "router.vllm.ai/labels"
"""Pod annotation: the backend's labels, comma-separated (e.g. `prefill`)."""
MODEL_LABEL = "model"
"""Pod label read as the one backend label when the annotation is absent (production-stack)."""

LIST_PAGE_SIZE = 500
MAX_EVENT_BYTES = 16 * 1024 * 1024
"""Longest watch line accepted; aiohttp's `readline` would stop at 128 KiB, which a pod with big
annotations can pass."""
PARSE_IN_THREAD_BYTES = 256 * 1024
"""A pod list larger than this is decoded in a thread, so a big fleet does not stall requests."""
QUICK_END = 1.0
"""A watch that ends cleanly within this many seconds with no event counts as a failure (backoff),
so an API server or proxy that closes every watch at once cannot cause a hot loop."""
MAX_CONCURRENT_FETCHES = 16


class K8sConfigError(ValueError):
    """Kubernetes discovery cannot start: the message says what is missing or wrong."""


@dataclass(frozen=True)
class K8sSettings:
    """What to discover and how to reach the API server. Validated on creation (ValueError)."""

    namespace: str | None = None
    """None: the router pod's own namespace (service account), else the kubeconfig context's,
    else `default`."""
    label_selector: str = ""
    """As in `kubectl get pods -l`, e.g. `app=vllm,tier!=canary`; empty selects every pod."""
    port: int = 8000
    """The engine port on each pod (a pod's `router.vllm.ai/port` annotation overrides it)."""
    scheme: str = "http"
    kubeconfig: str | None = None
    """A kubeconfig path; when set it wins over the in-cluster service account."""
    context: str | None = None
    """The kubeconfig context; None: its `current-context`."""
    api_server: str | None = None
    """In-cluster API server URL (`in_cluster_api_server(os.environ)`); None outside a pod."""
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    models_refresh: float = 30.0
    """Seconds between re-reads of every engine's `/v1/models` (LoRA adapters come and go); also
    the longest wait between retries for an engine whose models are not known yet."""
    model_fetch_timeout: float = 5.0
    engine_api_key: str | None = field(default=None, repr=False)
    """Bearer token for the engines' `/v1/models` (vLLM `--api-key`)."""
    watch_timeout: int = 300
    """`timeoutSeconds` of each watch; the server ends it then and it is resumed."""
    request_timeout: float = 30.0
    """Seconds for one LIST page, and to connect for a WATCH."""
    token_reload: float = 60.0
    """Seconds between re-reads of a token file (kubelet rotates service-account tokens)."""
    retry_min: float = 0.5
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"k8s port must be between 1 and 65535, not {self.port}")
        if self.scheme not in ("http", "https"):
            raise ValueError(f"k8s scheme must be http or https, not {self.scheme!r}")
        if self.namespace is not None and not self.namespace.strip():
            raise ValueError("k8s namespace must not be empty (leave it unset for the pod's own)")
        for name in ("models_refresh", "model_fetch_timeout", "request_timeout", "token_reload",
                     "retry_min", "retry_max"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"k8s {name} must be a positive number of seconds, not {value}")
        if self.watch_timeout < 1:
            raise ValueError(f"k8s watch_timeout must be at least 1 second, not "
                             f"{self.watch_timeout}")
        if self.retry_max < self.retry_min:
            raise ValueError("k8s retry_max must not be below retry_min")


def in_cluster_api_server(environ: Mapping[str, str]) -> str | None:
    """The API server URL a pod's environment names; None outside a pod."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    if not host:
        return None
    port = environ.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class K8sAccess:
    """How to talk to the API server: loaded once (`load_access`), before the loop runs it."""

    server: str
    """Base URL without a trailing slash, e.g. `https://10.96.0.1:443`."""
    namespace: str
    ssl: ssl.SSLContext | bool = True
    """For aiohttp's `ssl=`: a context with the cluster CA (and client certificate); False only
    for `insecure-skip-tls-verify`."""
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    """Re-read every `K8sSettings.token_reload` seconds and after a 401."""
    server_hostname: str | None = None
    """The name to verify the server certificate against (kubeconfig `tls-server-name`)."""
    source: str = ""
    """Where the credentials came from, for log lines."""


async def load_access(settings: K8sSettings) -> K8sAccess:
    """Read the credentials in a thread; raises `K8sConfigError` saying what is wrong."""
    return await asyncio.to_thread(read_access, settings)


def read_access(settings: K8sSettings) -> K8sAccess:
    """Blocking: read the kubeconfig or the service account files. Call it in a thread."""
    if settings.kubeconfig:
        return _from_kubeconfig(settings, settings.kubeconfig)
    if settings.api_server:
        return _in_cluster(settings, settings.api_server)
    raise K8sConfigError(
        "kubernetes discovery: not running in a pod (KUBERNETES_SERVICE_HOST is not set) and "
        "no kubeconfig given (--k8s-kubeconfig or KUBECONFIG)"
    )


def _in_cluster(settings: K8sSettings, api_server: str) -> K8sAccess:
    account = Path(settings.service_account_dir)
    server = api_server.rstrip("/")
    token_path = account / "token"
    token = _read_token(token_path, "the service-account token")
    namespace = settings.namespace or _read_optional(account / "namespace") or "default"
    context: ssl.SSLContext | bool = True
    if server.startswith("https://"):
        # Plain http is only for a local proxy (`kubectl proxy`) and tests.
        context = _ssl_context(f"the service-account CA {account / 'ca.crt'}",
                               cafile=str(account / "ca.crt"))
    return K8sAccess(server=server, namespace=namespace, ssl=context, token=token,
                     token_file=str(token_path), source=f"the service account in {account}")


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise K8sConfigError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if not token:
        raise K8sConfigError(f"{what} {path} is empty")
    return token


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def parse_kubeconfig(text: str, where: str) -> dict[str, Any]:
    """A kubeconfig's content, YAML or JSON (a subset of YAML)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise K8sConfigError(f"{where}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise K8sConfigError(f"{where}: not a kubeconfig (expected a mapping at the top)")
    return data


def _named(config: Mapping[str, Any], section: str, key: str, name: Any,
           where: str) -> dict[str, Any]:
    entries = config.get(section)
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key)
            if not isinstance(value, dict):
                raise K8sConfigError(f"{where}: {section} entry {name!r} has no {key!r} mapping")
            return value
    raise K8sConfigError(f"{where}: no entry named {name!r} in {section!r}")


def _from_kubeconfig(settings: K8sSettings, kubeconfig: str) -> K8sAccess:
    path = Path(kubeconfig).expanduser()
    where = f"kubeconfig {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise K8sConfigError(f"cannot read {where}: {error.strerror or error}") from None
    config = parse_kubeconfig(text, where)
    context_name = settings.context or config.get("current-context")
    if not context_name:
        raise K8sConfigError(f"{where}: no current-context set, and no context chosen")
    context = _named(config, "contexts", "context", context_name, where)
    where = f"{where} context {context_name!r}"
    cluster = _named(config, "clusters", "cluster", context.get("cluster"), where)
    user_name = context.get("user")
    user = _named(config, "users", "user", user_name, where) if user_name else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise K8sConfigError(f"{where}: the cluster has no http(s) server URL: {server!r}")
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise K8sConfigError(
                f"{where}: user {user_name!r} gets its credentials from an {plugin} plugin, "
                "which the router does not run; use a service-account token (token or "
                "tokenFile) or a client certificate"
            )
    if user.get("username") or user.get("password"):
        raise K8sConfigError(f"{where}: basic authentication (username/password) is not "
                             "supported; use a token or a client certificate")
    if cluster.get("proxy-url"):
        raise K8sConfigError(f"{where}: proxy-url is not supported")
    base = path.parent

    def local(value: Any) -> str | None:
        """A file a kubeconfig names: relative paths are relative to the kubeconfig."""
        if not value:
            return None
        return str((base / Path(str(value)).expanduser()))

    token = user.get("token") or None
    token_file = local(user.get("tokenFile"))
    if token is None and token_file is not None:
        token = _read_token(Path(token_file), f"{where}: tokenFile")
    context_ssl: ssl.SSLContext | bool = True
    if server.startswith("https://"):
        context_ssl = _ssl_context(
            f"{where}: the cluster CA",
            cafile=local(cluster.get("certificate-authority")),
            cadata=_b64(cluster.get("certificate-authority-data"), where,
                        "certificate-authority-data"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )
        cert_file = local(user.get("client-certificate"))
        cert_data = _b64(user.get("client-certificate-data"), where, "client-certificate-data")
        key_file = local(user.get("client-key"))
        key_data = _b64(user.get("client-key-data"), where, "client-key-data")
        if (cert_file or cert_data) or (key_file or key_data):
            assert isinstance(context_ssl, ssl.SSLContext)
            _load_client_cert(context_ssl, where, cert_file, cert_data, key_file, key_data)
    namespace = settings.namespace or context.get("namespace") or "default"
    hostname = cluster.get("tls-server-name")
    return K8sAccess(
        server=server.rstrip("/"), namespace=str(namespace), ssl=context_ssl,
        token=str(token) if token else None, token_file=token_file,
        server_hostname=str(hostname) if hostname else None, source=where,
    )


def _b64(value: Any, where: str, key: str) -> bytes | None:
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise K8sConfigError(f"{where}: {key} is not base64") from None


def _ssl_context(what: str, cafile: str | None = None, cadata: bytes | None = None,
                 insecure: bool = False) -> ssl.SSLContext:
    """A client context trusting the cluster CA (the system's when none is given)."""
    try:
        if insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif cadata is not None:
            context = ssl.create_default_context(cadata=cadata.decode("ascii"))
        else:
            context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError, UnicodeDecodeError) as error:
        raise K8sConfigError(f"cannot load {what}: {error}") from None
    return context


def _load_client_cert(context: ssl.SSLContext, where: str, cert_file: str | None,
                      cert_data: bytes | None, key_file: str | None,
                      key_data: bytes | None) -> None:
    if not (cert_file or cert_data) or not (key_file or key_data):
        raise K8sConfigError(f"{where}: a client certificate needs both the certificate and "
                             "the key")
    try:
        if cert_file and key_file:
            context.load_cert_chain(cert_file, key_file)
            return
        # ssl loads a certificate only from files: write the embedded ones to a private
        # directory (0700) for as long as the load takes.
        with tempfile.TemporaryDirectory(prefix="router-k8s-") as scratch:
            if cert_file is None:
                assert cert_data is not None
                cert_file = str(Path(scratch) / "client.crt")
                Path(cert_file).write_bytes(cert_data)
            if key_file is None:
                assert key_data is not None
                key_file = str(Path(scratch) / "client.key")
                Path(key_file).write_bytes(key_data)
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise K8sConfigError(f"{where}: cannot load the client certificate: {error}") from None


class _Token:
    """The bearer token, re-read from its file now and then (kubelet rotates it) and after a 401."""

    def __init__(self, access: K8sAccess, reload_after: float) -> None:
        self._value = access.token
        self._file = access.token_file
        self._reload_after = reload_after
        self._read_at = time.monotonic()

    async def value(self) -> str | None:
        if self._file is not None and time.monotonic() - self._read_at >= self._reload_after:
            self._read_at = time.monotonic()
            try:
                token = await asyncio.to_thread(_read_token, Path(self._file), "the token")
            except K8sConfigError as error:
                log.warning("%s; keeping the token read before", error)
            else:
                if token != self._value:
                    log.info("the token in %s changed; using the new one", self._file)
                self._value = token
        return self._value

    def expire(self) -> None:
        """Read the file again before the next request."""
        self._read_at = -math.inf


# --------------------------------------------------------------------------- pods


@dataclass(frozen=True, slots=True)
class PodTarget:
    """What one pod means for routing: its engine URL when routable, else why not."""

    name: str
    url: str | None
    reason: str = ""
    """Why the pod is not routable; empty when it is."""
    labels: tuple[str, ...] = ()


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def pod_labels(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    raw = _mapping(metadata.get("annotations")).get(LABELS_ANNOTATION)
    if isinstance(raw, str):
        return tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    value = _mapping(metadata.get("labels")).get(MODEL_LABEL)
    return (value,) if isinstance(value, str) and value else ()


def pod_target(pod: Mapping[str, Any], settings: K8sSettings) -> PodTarget:
    """Whether a pod object (from a list or a watch event) is routable, and where.

    Raises ValueError for an object without `metadata.name`."""
    metadata = _mapping(pod.get("metadata"))
    status = _mapping(pod.get("status"))
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a pod object without metadata.name")
    labels = pod_labels(metadata)

    def not_routable(reason: str) -> PodTarget:
        return PodTarget(name, None, reason, labels)

    if metadata.get("deletionTimestamp"):
        return not_routable("terminating (deletionTimestamp is set)")
    phase = status.get("phase")
    if phase != "Running":
        return not_routable(f"phase {phase or 'unknown'}")
    conditions = status.get("conditions")
    if not any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in (conditions if isinstance(conditions, list) else ())
    ):
        return not_routable("not Ready")
    ip = status.get("podIP")
    if not isinstance(ip, str) or not ip:
        return not_routable("no pod IP")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return not_routable(f"pod IP {ip!r} is not an IP address")
    port = settings.port
    annotated = _mapping(metadata.get("annotations")).get(PORT_ANNOTATION)
    if annotated is not None:
        try:
            port = int(str(annotated))
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            return not_routable(f"bad annotation {PORT_ANNOTATION}={annotated!r}")
    host = f"[{address}]" if address.version == 6 else str(address)
    return PodTarget(name, f"{settings.scheme}://{host}:{port}", "", labels)


# --------------------------------------------------------------------------- the watch


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _Gone(Exception):
    """410: the resourceVersion is too old (compacted); only a new LIST helps."""


class _WatchBroken(Exception):
    """The watch stream cannot be trusted any more: events may have been lost."""


class _ModelsError(Exception):
    """An engine's `/v1/models` did not give a model list."""


class _Lines:
    """Splits the watch stream into lines, bounded by `limit` bytes a line."""

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer
        scan_from = len(buffer)  # what was kept holds no newline
        buffer += chunk
        lines = []
        start = 0
        while (end := buffer.find(b"\n", max(start, scan_from))) >= 0:
            lines.append(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]
        if len(buffer) > self._limit:
            raise _WatchBroken(f"a watch event longer than {self._limit} bytes")
        return lines

    def rest(self) -> bytes:
        return bytes(self._buffer)


async def _api_error(response: aiohttp.ClientResponse) -> Exception:
    """The error a non-200 answer means; Kubernetes sends a `Status` object with a message."""
    try:
        raw = await response.content.read(64 * 1024)
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    message = ""
    try:
        status = json.loads(raw)
        if isinstance(status, dict):
            message = str(status.get("message") or status.get("reason") or "")
    except ValueError:
        message = raw.decode("utf-8", errors="replace").strip()[:300]
    message = message or response.reason or "no message"
    if response.status == 410:
        return _Gone(message)
    return _ApiError(response.status, message)


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class KubernetesDiscovery:
    """Keeps `pool` equal to the routable engine pods. Run `run()` as a task; cancel it to stop.

    `session` is owned by the caller (see `kubernetes_discovery`) and serves both the API server
    calls and the engines' `/v1/models`."""

    def __init__(self, pool: BackendPool, settings: K8sSettings, access: K8sAccess,
                 session: aiohttp.ClientSession) -> None:
        self.pool = pool
        self.settings = settings
        self.access = access
        self.session = session
        self.namespace = access.namespace
        self.resource_version: str | None = None
        """The last resourceVersion seen (list, event or bookmark)."""
        self.synced = asyncio.Event()
        """Set once the first LIST has been applied."""
        self._pods_url = f"{access.server}/api/v1/namespaces/{quote(self.namespace, safe='')}/pods"
        self._token = _Token(access, settings.token_reload)
        self._pods: dict[str, PodTarget] = {}
        """Every pod the selector matches, by name, routable or not."""
        self._models: dict[str, tuple[str, ...]] = {}
        """Models per engine URL, for routable pods whose engine answered."""
        self._owners: dict[str, str] = {}
        """The pod whose engine gave `_models[url]`: a new pod on a reused IP asks again."""
        self._learning: dict[str, asyncio.Task[None]] = {}
        """Per engine URL whose models are unknown: the task asking until it answers."""
        self._backends: dict[str, Backend] = {}
        """What the pool was last given, by URL."""
        self._names: dict[str, str] = {}
        """Pod name per published URL, for log lines."""
        self._failures = 0
        self._last_failure = -math.inf
        self._failing = False
        self._watching = False
        self._fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self._list_timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
        # No total limit: a watch lasts `watch_timeout`. A silent connection is dead once it
        # has said nothing for longer than that.
        self._watch_client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.request_timeout,
            sock_read=settings.watch_timeout + settings.request_timeout,
        )
        self._models_timeout = aiohttp.ClientTimeout(total=settings.model_fetch_timeout)

    # ----------------------------------------------------------------- the loop

    async def run(self) -> None:
        """List, watch, and list again when needed, until cancelled; never raises otherwise."""
        refresher = asyncio.create_task(self._refresh_models_forever(),
                                        name="k8s-models-refresh")
        try:
            await self._list_and_watch_forever()
        finally:
            tasks = [refresher, *self._learning.values()]
            self._learning.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _list_and_watch_forever(self) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                opened = time.monotonic()
                version, events = await self._watch(version)
            except _Gone as gone:
                delay = self._next_delay(first_free=True)
                log.info("resourceVersion %s is too old (%s): listing pods again%s",
                         self.resource_version, gone, _after(delay))
                version = None
            except Exception as error:  # whatever it was, the loop goes on: list again
                delay = self._next_delay()
                self._log_failure(error, delay)
                version = None
            else:
                if events or time.monotonic() - opened >= QUICK_END:
                    log.debug("the pod watch ended; resuming at resourceVersion %s", version)
                    continue
                delay = self._next_delay()
                log.warning("the pod watch ended at once; resuming%s", _after(delay))
            if delay:
                await asyncio.sleep(delay)

    def _next_delay(self, *, first_free: bool = False) -> float:
        """Exponential backoff with jitter; failures far apart start again from the bottom."""
        now = time.monotonic()
        if now - self._last_failure > 2 * self.settings.retry_max:
            self._failures = 0
        self._last_failure = now
        self._failures += 1
        steps = self._failures - 1
        if first_free:
            if steps == 0:
                return 0.0
            steps -= 1
        base = min(self.settings.retry_max, self.settings.retry_min * 2.0 ** min(steps, 30))
        return base * random.uniform(0.5, 1.0)

    def _log_failure(self, error: Exception, delay: float) -> None:
        # "Answers again" is worth a line after the API failed us, not after a broken stream.
        self._failing = not isinstance(error, (_WatchBroken, aiohttp.ClientPayloadError))
        self._watching = False
        where = f"pods in namespace {self.namespace}"
        then = f"; listing again{_after(delay)}"
        if isinstance(error, _ApiError) and error.status == 401:
            self._token.expire()
            log.error("the kubernetes API rejected the credentials from %s (HTTP 401: %s) for "
                      "%s: check the token%s", self.access.source, error.message, where, then)
        elif isinstance(error, _ApiError) and error.status == 403:
            log.error("the kubernetes API forbids reading %s (HTTP 403: %s): grant get, list "
                      "and watch on pods to the router's service account (see "
                      "docs/deploy/kubernetes/rbac.yaml)%s", where, error.message, then)
        elif isinstance(error, _ApiError):
            log.warning("the kubernetes API answered HTTP %d (%s) when asked for %s%s",
                        error.status, error.message, where, then)
        elif isinstance(error, aiohttp.ClientConnectorCertificateError):
            log.error("cannot verify the kubernetes API server %s: %s%s", self.access.server,
                      _short(error), then)
        elif isinstance(error, _WatchBroken):
            log.warning("the pod watch broke: %s%s", error, then)
        elif isinstance(error, aiohttp.ClientPayloadError):
            log.warning("the pod watch broke off: %s%s", _short(error), then)
        elif isinstance(error, TimeoutError):
            log.warning("the kubernetes API at %s did not answer in time%s",
                        self.access.server, then)
        elif isinstance(error, (aiohttp.ClientError, OSError)):
            log.warning("cannot reach the kubernetes API at %s: %s%s", self.access.server,
                        _short(error), then)
        else:
            log.error("kubernetes discovery failed unexpectedly%s", then, exc_info=error)

    async def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"router/{__version__}"}
        token = await self._token.value()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _query(self, **params: str) -> dict[str, str]:
        if self.settings.label_selector:
            params["labelSelector"] = self.settings.label_selector
        return params

    async def _list(self) -> str:
        """LIST the pods (in pages) and make them the pod set; returns the resourceVersion."""
        items: list[Any] = []
        params = self._query(limit=str(LIST_PAGE_SIZE))
        while True:
            async with self.session.get(
                self._pods_url, params=params, headers=await self._headers(),
                ssl=self.access.ssl, server_hostname=self.access.server_hostname,
                timeout=self._list_timeout, allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise await _api_error(response)
                raw = await response.read()
            try:
                if len(raw) > PARSE_IN_THREAD_BYTES:
                    body = await asyncio.to_thread(json.loads, raw)
                else:
                    body = json.loads(raw)
            except (ValueError, RecursionError):
                raise _ApiError(200, "the pod list is not JSON") from None
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise _ApiError(200, "the answer is not a pod list")
            items.extend(body["items"])
            metadata = _mapping(body.get("metadata"))
            more = metadata.get("continue")
            if not more:
                break
            params = {**params, "continue": str(more)}
        version = metadata.get("resourceVersion")
        if not isinstance(version, str) or not version:
            raise _ApiError(200, "the pod list has no metadata.resourceVersion")
        if self._failing:
            log.info("the kubernetes API answers again")
            self._failing = False
        self._replace_all(items)
        self.resource_version = version
        log.info("listed %d pods in namespace %s (%d routable) at resourceVersion %s",
                 len(self._pods), self.namespace, sum(1 for p in self._pods.values() if p.url),
                 version)
        self.synced.set()
        return version

    async def _watch(self, version: str) -> tuple[str, int]:
        """WATCH from `version` until the server ends the stream; returns the last
        resourceVersion and the number of events. Raises when the stream cannot be trusted."""
        params = self._query(watch="1", resourceVersion=version, allowWatchBookmarks="true",
                             timeoutSeconds=str(self.settings.watch_timeout))
        events = 0
        async with self.session.get(
            self._pods_url, params=params, headers=await self._headers(),
            ssl=self.access.ssl, server_hostname=self.access.server_hostname,
            timeout=self._watch_client_timeout, allow_redirects=False,
        ) as response:
            if response.status != 200:
                raise await _api_error(response)
            if not self._watching:
                log.info("watching pods in namespace %s from resourceVersion %s",
                         self.namespace, version)
                self._watching = True
            lines = _Lines(MAX_EVENT_BYTES)
            async for chunk in response.content.iter_any():
                for line in lines.feed(chunk):
                    if line.strip():
                        version = self._on_event(line, version)
                        events += 1
            tail = lines.rest()
            if tail.strip():
                version = self._on_event(tail, version)
                events += 1
        return version, events

    def _on_event(self, line: bytes, version: str) -> str:
        """Apply one watch event; returns the resourceVersion it carries (or `version`)."""
        try:
            event = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise _WatchBroken(f"an undecodable event ({_short(error)})") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            log.warning("skipped a watch event without an object: %.200r", line)
            return version
        kind = event.get("type")
        obj: dict[str, Any] = event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            message = obj.get("message") or obj.get("reason") or "no message"
            if code == 410:
                raise _Gone(message)
            raise _WatchBroken(f"an ERROR event (code {code}: {message})")
        try:
            if kind in ("ADDED", "MODIFIED"):
                self._upsert(obj)
            elif kind == "DELETED":
                self._delete(obj)
            elif kind != "BOOKMARK":
                log.warning("skipped a watch event of unknown type %r", kind)
        except Exception:  # one bad event must not end the watch
            log.exception("skipped a %s event that could not be applied", kind)
        new_version = _mapping(obj.get("metadata")).get("resourceVersion")
        if isinstance(new_version, str) and new_version:
            version = self.resource_version = new_version
        return version

    # ----------------------------------------------------------------- the pod set

    def _target(self, pod: Any) -> PodTarget | None:
        try:
            return pod_target(pod if isinstance(pod, dict) else {}, self.settings)
        except ValueError as error:
            log.warning("skipped a pod: %s", error)
            return None

    def _replace_all(self, items: list[Any]) -> None:
        fresh: dict[str, PodTarget] = {}
        for item in items:
            target = self._target(item)
            if target is not None:
                fresh[target.name] = target
        for name, old in self._pods.items():
            if name not in fresh and old.url:
                # The USER-ASKS 8 case: its DELETED event was lost; the list tells.
                log.info("pod %s is gone (not in the new pod list)", name)
        for name, target in fresh.items():
            self._log_transition(self._pods.get(name), target)
        self._pods = fresh
        self._sync()

    def _upsert(self, pod: dict[str, Any]) -> None:
        target = self._target(pod)
        if target is None:
            return
        self._log_transition(self._pods.get(target.name), target)
        self._pods[target.name] = target
        self._sync()

    def _delete(self, pod: dict[str, Any]) -> None:
        name = _mapping(pod.get("metadata")).get("name")
        if not isinstance(name, str):
            log.warning("skipped a DELETED event without metadata.name")
            return
        old = self._pods.pop(name, None)
        if old is not None and old.url:
            log.info("pod %s was deleted", name)
        self._sync()

    @staticmethod
    def _log_transition(old: PodTarget | None, new: PodTarget) -> None:
        was_routable = old is not None and old.url is not None
        if new.url and not was_routable:
            log.info("pod %s is Ready at %s", new.name, new.url)
        elif was_routable and not new.url:
            log.info("pod %s is no longer routable: %s", new.name, new.reason)
        elif was_routable and old is not None and new.url != old.url:
            log.info("pod %s moved from %s to %s", new.name, old.url, new.url)
        elif not new.url and (old is None or old.reason != new.reason):
            log.debug("pod %s is not routable: %s", new.name, new.reason)

    def _wanted(self) -> dict[str, PodTarget]:
        """Routable pods by engine URL, in name order (the first pod wins a shared URL)."""
        wanted: dict[str, PodTarget] = {}
        for name in sorted(self._pods):
            target = self._pods[name]
            if target.url is not None and target.url not in wanted:
                wanted[target.url] = target
        return wanted

    def _sync(self) -> None:
        """Drop what belongs to pods that left, ask new ones for their models, publish."""
        wanted = self._wanted()
        for url in [url for url in self._learning if url not in wanted]:
            self._learning.pop(url).cancel()
        for url in [url for url in self._models
                    if url not in wanted or self._owners.get(url) != wanted[url].name]:
            del self._models[url]
            self._owners.pop(url, None)
        for url, target in wanted.items():
            if url not in self._models and url not in self._learning:
                self._learning[url] = asyncio.create_task(
                    self._learn(url, target.name), name=f"k8s-models {target.name}")
        self._publish(wanted)

    def _publish(self, wanted: dict[str, PodTarget]) -> None:
        """Give the pool the routable pods whose models are known, if that set changed."""
        backends: dict[str, Backend] = {}
        for url, target in wanted.items():
            models = self._models.get(url)
            if models is None:
                continue
            current = self._backends.get(url)
            if current is not None and current.models == models \
                    and current.labels == target.labels:
                backends[url] = current
            else:
                backends[url] = Backend(url=url, models=models, labels=target.labels)
        if backends.keys() == self._backends.keys() and all(
            backends[url] is self._backends[url] for url in backends
        ):
            return
        names = {url: wanted[url].name for url in backends}
        for url in self._backends.keys() - backends.keys():
            log.info("backend %s removed (pod %s)", url, self._names.get(url, "?"))
        for url, backend in backends.items():
            old = self._backends.get(url)
            labels = f", labels {', '.join(backend.labels)}" if backend.labels else ""
            if old is None:
                log.info("backend %s added (pod %s): %s%s", url, names[url],
                         ", ".join(backend.models), labels)
            elif old is not backend:
                log.info("backend %s (pod %s) now serves %s%s", url, names[url],
                         ", ".join(backend.models), labels)
        self._backends = backends
        self._names = names
        self.pool.replace(backends.values())

    # ----------------------------------------------------------------- models

    async def _learn(self, url: str, pod: str) -> None:
        """Ask a new engine for its models until it answers; then it is routed."""
        delay = min(1.0, self.settings.models_refresh)
        failures = 0
        try:
            while True:
                try:
                    models = await self._fetch_models(url)
                    break
                except _ModelsError as error:
                    failures += 1
                    if failures == 1:
                        log.info("pod %s is Ready but %s/v1/models failed (%s): not routed "
                                 "until it answers", pod, url, error)
                    else:
                        log.debug("pod %s: %s/v1/models failed again: %s", pod, url, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.models_refresh)
        finally:
            if self._learning.get(url) is asyncio.current_task():
                del self._learning[url]
        wanted = self._wanted()
        if url in wanted:
            self._models[url] = models
            self._owners[url] = wanted[url].name
            self._publish(wanted)

    async def _fetch_models(self, url: str) -> tuple[str, ...]:
        headers = {"Accept": "application/json"}
        if self.settings.engine_api_key:
            headers["Authorization"] = f"Bearer {self.settings.engine_api_key}"
        try:
            async with self._fetch_slots:
                async with self.session.get(url + "/v1/models", headers=headers,
                                            timeout=self._models_timeout,
                                            allow_redirects=False) as response:
                    if response.status != 200:
                        raise _ModelsError(f"HTTP {response.status}")
                    body = await response.json(content_type=None)
        except TimeoutError:
            raise _ModelsError(f"no answer within {self.settings.model_fetch_timeout:g}s") \
                from None
        except (aiohttp.ClientError, OSError, ValueError) as error:
            raise _ModelsError(_short(error)) from None
        data = body.get("data") if isinstance(body, dict) else None
        models = tuple(dict.fromkeys(
            item["id"] for item in (data if isinstance(data, list) else ())
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
        ))
        if not models:
            raise _ModelsError("the answer lists no model")
        return models

    async def _refresh_models_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.models_refresh)
            try:
                await self.refresh_models()
            except Exception:  # a dead refresher would freeze every model list
                log.exception("refreshing the engines' models failed")

    async def refresh_models(self) -> None:
        """Ask every routed engine for its models again (LoRA adapters are loaded at run time).
        An engine that does not answer keeps the models it had; health checks judge it."""
        urls = [url for url in self._wanted() if url in self._models]
        results = await asyncio.gather(*(self._fetch_models(url) for url in urls),
                                       return_exceptions=True)
        wanted = self._wanted()
        changed = False
        for url, result in zip(urls, results):
            if isinstance(result, BaseException):
                log.debug("refreshing the models of %s failed: %s", url, result)
            elif url in wanted and url in self._models and self._models[url] != result:
                self._models[url] = result
                changed = True
        if changed:
            self._publish(wanted)

    def __repr__(self) -> str:
        routable = sum(1 for target in self._pods.values() if target.url)
        state = "watching" if self._watching else "listing"
        return (f"<KubernetesDiscovery {self.namespace}/{self.settings.label_selector or '*'} "
                f"pods={len(self._pods)} routable={routable} backends={len(self._backends)} "
                f"rv={self.resource_version} {state}>")


def _after(delay: float) -> str:
    return f" in {delay:.2g}s" if delay else " now"


def kubernetes_discovery(
    pool: BackendPool, settings: K8sSettings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx: load the credentials at startup (a bad kubeconfig or missing service
    account stops the start with `K8sConfigError`), then run the discovery as a task with a
    session of its own until cleanup."""

    async def discovery(app: web.Application) -> AsyncIterator[None]:
        access = await load_access(settings)
        log.info("kubernetes discovery: pods in namespace %s%s, engines on port %d, via %s (%s)",
                 access.namespace,
                 f" matching {settings.label_selector!r}" if settings.label_selector else "",
                 settings.port, access.server, access.source)
        if access.ssl is False or (isinstance(access.ssl, ssl.SSLContext)
                                   and access.ssl.verify_mode == ssl.CERT_NONE):
            log.warning("the kubernetes API server's certificate is not verified "
                        "(insecure-skip-tls-verify)")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            task = asyncio.create_task(
                KubernetesDiscovery(pool, settings, access, session).run(),
                name="kubernetes-discovery")
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    return discovery
