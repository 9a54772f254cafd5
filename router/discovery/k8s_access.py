"""Kubernetes credentials: the pod's service account or a kubeconfig, for the watch in
`router.discovery.kubernetes`.

The pod's service account: `KUBERNETES_SERVICE_HOST`/`_PORT`, and the token, CA and namespace
under `/var/run/secrets/kubernetes.io/serviceaccount`. A kubeconfig: server, CA file or data,
token, tokenFile, client certificate and key; not exec or auth-provider plugins.

Everything here reads files, so callers run it before the event loop or in a thread
(`load_access`). The token is re-read every minute and after a 401, as kubelet rotates it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.config.settings import K8sSettings

__all__ = [
    "K8sConfigError", "K8sAccess", "Token", "in_cluster_api_server", "load_access", "read_access",
    "parse_kubeconfig",
]

log = logging.getLogger("router.k8s")


class K8sConfigError(ValueError):
    """Kubernetes discovery cannot start: the message says what is missing or wrong."""


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
    """The namespace watched."""
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
    home_namespace: str | None = None
    """The router's own namespace, where a service's short name resolves: the service
    account's, or with a kubeconfig its context's (else `default`); None: unknown."""


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
    home = _read_optional(account / "namespace")
    namespace = settings.namespace or home or "default"
    context: ssl.SSLContext | bool = True
    if server.startswith("https://"):
        # Plain http is only for a local proxy (`kubectl proxy`) and tests.
        context = _ssl_context(f"the service-account CA {account / 'ca.crt'}",
                               cafile=str(account / "ca.crt"))
    return K8sAccess(server=server, namespace=namespace, ssl=context, token=token,
                     token_file=str(token_path), source=f"the service account in {account}",
                     home_namespace=home)


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
    home = str(context.get("namespace") or "default")
    namespace = settings.namespace or home
    hostname = cluster.get("tls-server-name")
    return K8sAccess(
        server=server.rstrip("/"), namespace=str(namespace), ssl=context_ssl,
        token=str(token) if token else None, token_file=token_file,
        server_hostname=str(hostname) if hostname else None, source=where, home_namespace=home,
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


class Token:
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
