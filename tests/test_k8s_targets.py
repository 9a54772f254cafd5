"""What a pod or a service means for routing (router/discovery/k8s_targets.py): pure rules,
checked on objects shaped as the API server returns them (tests/k8s_stand_in.py)."""

from __future__ import annotations

from typing import Any

import pytest

from router.config.settings import K8sSettings
from router.discovery.k8s_targets import (
    LABELS_ANNOTATION,
    PORT_ANNOTATION,
    pod_target,
    service_target,
)
from tests.k8s_stand_in import Pod, Service, make_pod, make_service


def _edited(obj: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`obj` with `a__b=value` set at obj["a"]["b"] (None removes the key)."""
    for path, value in changes.items():
        where: Any = obj
        *parents, leaf = path.split("__")
        for key in parents:
            where = where[key]
        if value is None:
            where.pop(leaf, None)
        else:
            where[leaf] = value
    return obj


def _pod(**changes: Any) -> Pod:
    return _edited(make_pod("vllm-0", ip="10.1.2.3"), changes)


def _service(**changes: Any) -> Service:
    return _edited(make_service("vllm-0", port=8000), changes)


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize(("pod", "url", "reason"), [
    (_pod(), "http://10.1.2.3:8000", ""),
    (_pod(status__podIP="fd00::5"), "http://[fd00::5]:8000", ""),
    (_pod(metadata__annotations={"router.vllm.ai/port": "9000"}), "http://10.1.2.3:9000", ""),
    (_pod(metadata__annotations={"router.vllm.ai/port": "http"}), None, "bad annotation"),
    (_pod(metadata__annotations={"router.vllm.ai/port": "70000"}), None, "bad annotation"),
    (_pod(status__phase="Pending"), None, "phase Pending"),
    (_pod(status__phase="Succeeded"), None, "phase Succeeded"),
    (_pod(status__conditions=None), None, "not Ready"),
    (_pod(status__conditions=[{"type": "Ready", "status": "False"}]), None, "not Ready"),
    (_pod(status__podIP=None), None, "no pod IP"),
    (_pod(status__podIP="not-an-ip"), None, "not an IP address"),
    (_pod(metadata__deletionTimestamp="2026-01-01T00:00:00Z"), None, "terminating"),
    (_pod(status=None), None, "phase unknown"),
])
def test_pod_target_routes_only_running_ready_pods_with_an_ip(
    pod: Pod, url: str | None, reason: str,
) -> None:
    target = pod_target(pod, K8sSettings(port=8000))
    assert target.name == "vllm-0"
    assert target.url == url
    assert reason in target.reason and bool(target.reason) == bool(reason)


def test_pod_target_labels_and_scheme() -> None:
    both = _pod(metadata__labels={"model": "decode"},
                metadata__annotations={LABELS_ANNOTATION: "prefill, decode,prefill"})
    assert pod_target(both, K8sSettings()).labels == ("prefill", "decode")
    assert pod_target(_pod(metadata__labels={"model": "decode"}),
                      K8sSettings()).labels == ("decode",)
    assert pod_target(_pod(), K8sSettings(port=8443, scheme="https")).url == \
        "https://10.1.2.3:8443"
    with pytest.raises(ValueError, match="metadata.name"):
        pod_target({"metadata": {}}, K8sSettings())


# --------------------------------------------------------------------------- services


def _ports(*ports: int | tuple[int, int | str], protocol: str = "TCP") -> list[dict[str, Any]]:
    """Service ports: `port`, or `(port, targetPort)`."""
    entries = []
    for number, item in enumerate(ports):
        port, target = item if isinstance(item, tuple) else (item, item)
        entries.append({"name": f"p{number}", "protocol": protocol, "port": port,
                        "targetPort": target})
    return entries


@pytest.mark.parametrize(("service", "url", "reason"), [
    (_service(), "http://vllm-0:8000", ""),
    # --k8s-port (8000 here) when the service exposes it, else its first TCP port:
    (_service(spec__ports=_ports(80)), "http://vllm-0:80", ""),
    (_service(spec__ports=_ports(9090, 8000)), "http://vllm-0:8000", ""),
    (_service(spec__ports=_ports(9090, 80)), "http://vllm-0:9090", ""),
    (_service(spec__ports=_ports(53, protocol="UDP") + _ports(80)), "http://vllm-0:80", ""),
    (_service(spec__ports=_ports((80, 8000))), "http://vllm-0:80", ""),
    # The annotation wins over every port the service lists:
    (_service(spec__ports=_ports(80), metadata__annotations={PORT_ANNOTATION: "9000"}),
     "http://vllm-0:9000", ""),
    (_service(metadata__annotations={PORT_ANNOTATION: "http"}), None, "bad annotation"),
    # Headless: the name resolves to the pods, so their container port (a numeric targetPort):
    (_service(spec__clusterIP="None", spec__ports=_ports((80, 8080))), "http://vllm-0:8080", ""),
    (_service(spec__clusterIP="None", spec__ports=_ports((80, "http"))), "http://vllm-0:80", ""),
    (_service(spec__clusterIP="None", spec__ports=[]), "http://vllm-0:8000", ""),
    (_service(spec__ports=_ports(53, protocol="UDP")), None, "no TCP port"),
    (_service(metadata__deletionTimestamp="2026-01-01T00:00:00Z"), None, "terminating"),
])
def test_service_target_takes_the_annotated_the_flag_s_or_the_first_port(
    service: Service, url: str | None, reason: str,
) -> None:
    target = service_target(service, K8sSettings(port=8000))
    assert target.name == "vllm-0"
    assert target.url == url
    assert reason in target.reason and bool(target.reason) == bool(reason)


def test_service_in_another_namespace_is_reached_by_its_qualified_name() -> None:
    service = _service(spec__ports=_ports(80))
    assert service_target(service, K8sSettings(), "llm").url == "http://vllm-0.llm.svc:80"
    assert service_target(service, K8sSettings(scheme="https")).url == "https://vllm-0:80"


def test_service_labels_come_from_the_annotation_the_model_label_or_the_selector() -> None:
    annotated = _service(metadata__labels={"model": "decode"},
                         metadata__annotations={LABELS_ANNOTATION: "prefill"})
    assert service_target(annotated, K8sSettings()).labels == ("prefill",)
    labelled = _service(metadata__labels={"model": "decode"}, spec__selector={"model": "x"})
    assert service_target(labelled, K8sSettings()).labels == ("decode",)
    selecting = _service(spec__selector={"app": "vllm", "model": "prefill"})
    assert service_target(selecting, K8sSettings()).labels == ("prefill",)
    assert service_target(_service(), K8sSettings()).labels == ()
    with pytest.raises(ValueError, match="a service object without metadata.name"):
        service_target({"metadata": {}}, K8sSettings())
