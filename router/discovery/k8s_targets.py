"""What one Kubernetes object means for routing: a pod (`pod-ip` discovery) or a service
(`service-name` discovery) becomes a `Target`: the engine URL and the backend's labels, or why it
is not routable. Pure functions of the object; the set of them is kept in
`router.discovery.k8s_target_set`, fed by the watch in `router.discovery.kubernetes`.

Pods: routable while `Running`, `Ready`, with `status.podIP` and no `metadata.deletionTimestamp`
(Terminating); the URL is `SCHEME://POD_IP:PORT`, PORT being `--k8s-port` or the pod's
`router.vllm.ai/port` annotation.

Services: a Service has no readiness of its own, so one is routable while it exists (no
`deletionTimestamp`, which a Service only carries while finalizers run) and has a TCP port.
Whether anything answers behind it is for `GET /v1/models` (the service is not routed until it
answers) and then for the router's health probes and circuit breaker. The URL is built from the
name, as the cluster's DNS resolves it:

- `SCHEME://NAME:PORT` in the router's own namespace, where the pod's DNS search path resolves
  the short name (production-stack's router builds the same URL);
- `SCHEME://NAME.NAMESPACE.svc:PORT` for a service in another namespace (`--k8s-namespace`).

The port of a service, first match wins:

1. its `router.vllm.ai/port` annotation;
2. `--k8s-port`, when the service exposes that port or lists no ports at all (a headless
   service may list none);
3. its first TCP port.

For a headless service (`clusterIP: None`) the name resolves to the pods' own IPs, so the port
that counts is the container's: a numeric `targetPort`, not `port`.

Labels, for both kinds: the `router.vllm.ai/labels` annotation (comma-separated), else the label
`model`; a service also falls back on the `model` key of its selector, as production-stack does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.config.settings import K8sSettings

__all__ = [
    "Target", "pod_target", "service_target", "backend_labels", "as_mapping",
    "PORT_ANNOTATION", "LABELS_ANNOTATION", "MODEL_LABEL",
]

PORT_ANNOTATION = "router.vllm.ai/port"
"""Pod or service annotation: the engine port, overriding `K8sSettings.port`."""
LABELS_ANNOTATION = "router.vllm.ai/labels"
"""Pod or service annotation: the backend's labels, comma-separated (e.g. `prefill`)."""
MODEL_LABEL = "model"
"""Label read as the one backend label when the annotation is absent (production-stack)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What one pod or service means for routing: its engine URL when routable, else why not."""

    name: str
    url: str | None
    reason: str = ""
    """Why the object is not routable; empty when it is."""
    labels: tuple[str, ...] = ()


class _NotRoutable(Exception):
    """Why an object is not routable, in its message."""


def as_mapping(value: Any) -> Mapping[str, Any]:
    """`value` when it is a JSON object, else an empty one: API objects are read defensively."""
    return value if isinstance(value, dict) else {}


def backend_labels(obj: Mapping[str, Any]) -> tuple[str, ...]:
    metadata = as_mapping(obj.get("metadata"))
    raw = as_mapping(metadata.get("annotations")).get(LABELS_ANNOTATION)
    if isinstance(raw, str):
        return tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    # Pods have no spec.selector; services fall back on it (production-stack).
    for labels in (metadata.get("labels"), as_mapping(obj.get("spec")).get("selector")):
        value = as_mapping(labels).get(MODEL_LABEL)
        if isinstance(value, str) and value:
            return (value,)
    return ()


def _name(obj: Mapping[str, Any], kind: str) -> str:
    name = as_mapping(obj.get("metadata")).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} object without metadata.name")
    return name


def _annotated_port(metadata: Mapping[str, Any]) -> int | None:
    raw = as_mapping(metadata.get("annotations")).get(PORT_ANNOTATION)
    if raw is None:
        return None
    try:
        port = int(str(raw))
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise _NotRoutable(f"bad annotation {PORT_ANNOTATION}={raw!r}")
    return port


def pod_target(pod: Mapping[str, Any], settings: K8sSettings) -> Target:
    """Whether a pod object (from a list or a watch event) is routable, and where.

    Raises ValueError for an object without `metadata.name`."""
    name = _name(pod, "pod")
    labels = backend_labels(pod)
    try:
        url = _pod_url(pod, settings)
    except _NotRoutable as why:
        return Target(name, None, str(why), labels)
    return Target(name, url, "", labels)


def _pod_url(pod: Mapping[str, Any], settings: K8sSettings) -> str:
    metadata = as_mapping(pod.get("metadata"))
    status = as_mapping(pod.get("status"))
    if metadata.get("deletionTimestamp"):
        raise _NotRoutable("terminating (deletionTimestamp is set)")
    phase = status.get("phase")
    if phase != "Running":
        raise _NotRoutable(f"phase {phase or 'unknown'}")
    conditions = status.get("conditions")
    if not any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in (conditions if isinstance(conditions, list) else ())
    ):
        raise _NotRoutable("not Ready")
    ip = status.get("podIP")
    if not isinstance(ip, str) or not ip:
        raise _NotRoutable("no pod IP")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise _NotRoutable(f"pod IP {ip!r} is not an IP address") from None
    port = _annotated_port(metadata) or settings.port
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{settings.scheme}://{host}:{port}"


def service_target(service: Mapping[str, Any], settings: K8sSettings,
                   namespace: str | None = None) -> Target:
    """Whether a service object is routable, and at which name and port.

    `namespace` None: the service is in the router's own namespace and its short name is the
    host; else the host is `NAME.NAMESPACE.svc`. Raises ValueError for an object without
    `metadata.name`."""
    name = _name(service, "service")
    labels = backend_labels(service)
    try:
        if as_mapping(service.get("metadata")).get("deletionTimestamp"):
            raise _NotRoutable("terminating (deletionTimestamp is set)")
        port = _service_port(service, settings)
    except _NotRoutable as why:
        return Target(name, None, str(why), labels)
    host = name if namespace is None else f"{name}.{namespace}.svc"
    return Target(name, f"{settings.scheme}://{host}:{port}", "", labels)


def _service_port(service: Mapping[str, Any], settings: K8sSettings) -> int:
    annotated = _annotated_port(as_mapping(service.get("metadata")))
    if annotated is not None:
        return annotated
    spec = as_mapping(service.get("spec"))
    listed = spec.get("ports")
    if not listed:
        return settings.port
    headless = spec.get("clusterIP") == "None"
    ports: list[int] = []
    for entry in listed if isinstance(listed, list) else ():
        entry = as_mapping(entry)
        if entry.get("protocol", "TCP") != "TCP":
            continue
        port, target_port = entry.get("port"), entry.get("targetPort")
        if headless and isinstance(target_port, int):
            port = target_port  # the name resolves to the pods: their container port counts
        if isinstance(port, int) and 1 <= port <= 65535:
            ports.append(port)
    if not ports:
        raise _NotRoutable("no TCP port")
    return settings.port if settings.port in ports else ports[0]
