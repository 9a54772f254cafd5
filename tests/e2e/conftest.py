"""Real vLLM engines (CPU build) and the router in front of them, each its own process: two
chat engines (a tiny Llama) and one Whisper engine (a tiny Whisper that always says "hello").

`make e2e` sets `ROUTER_E2E_PYTHON` to a virtualenv with vLLM; without it every test here is
skipped with the reason. The engines take one to two minutes to start and are shared by the
whole session; everything is stopped at the end, logs are in the session's temp directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
WHISPER = "tiny-whisper"
ENGINE_START_TIMEOUT = 480.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(url: str, timeout: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}: not up after {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus exposition's samples `name` whose labels include `labels`."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


E2E_REPORTS = pytest.StashKey[list[tuple[str, str]]]()


def add_report(config: pytest.Config, title: str, text: str) -> None:
    """Text for the end of the run's terminal output (shown without `-s`), under `title`."""
    config.stash.setdefault(E2E_REPORTS, []).append((title, text))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, text in terminalreporter.config.stash.get(E2E_REPORTS, []):
        terminalreporter.section(title)
        terminalreporter.write(text)


@dataclass
class Fleet:
    engines: list[str]
    """The chat engines."""
    whisper: str
    router: str
    router_pid: int
    logs: Path


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = os.environ.get("ROUTER_E2E_PYTHON")
    if not python:
        pytest.skip("ROUTER_E2E_PYTHON is not set (run `make e2e`)")
    done = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"vLLM does not import in {python}: {done.stderr.strip()[-300:]}")
    return python


def build(python: str, kind: str, name: str) -> Path:
    cache = Path(os.environ.get("ROUTER_E2E_CACHE", ROOT / ".e2e-cache"))
    directory = cache / name
    subprocess.run([python, str(Path(__file__).with_name("build_models.py")), kind,
                    str(directory)], check=True, capture_output=True, timeout=600)
    return directory


def start_vllm(python: str, model: Path, name: str, max_len: int,
               log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
             "--max-model-len", str(max_len), "--dtype", "float32", "--enforce-eager"],
            stdout=out, stderr=subprocess.STDOUT, env=environ)
    return f"http://127.0.0.1:{port}", process


@pytest.fixture(scope="session")
def fleet(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("e2e-logs")
    llama = build(vllm_python, "llama", MODEL)
    whisper = build(vllm_python, "whisper", WHISPER)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        engines: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for number, (model, name, max_len) in enumerate(
                [(llama, MODEL, 512), (llama, MODEL, 512), (whisper, WHISPER, 448)]):
            log = logs / f"vllm{number}-{name}.log"
            url, process = start_vllm(vllm_python, model, name, max_len, log)
            processes.append(process)
            engines.append((url, process, log))
        for url, process, log in engines:
            wait_for(url + "/health", ENGINE_START_TIMEOUT, process, log)

        port = free_port()
        log = logs / "router.log"
        urls = [url for url, _, _ in engines]
        with log.open("wb") as out:
            router = subprocess.Popen(
                [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
                 "--static-backends", ",".join(urls),
                 "--static-models", ",".join([MODEL, MODEL, WHISPER]),
                 "--engine-stats-interval", "1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        processes.append(router)
        router_url = f"http://127.0.0.1:{port}"
        wait_for(router_url + "/ready", 60, router, log)
        yield Fleet(urls[:2], urls[2], router_url, router.pid, logs)
    finally:
        for process in reversed(processes):
            stop(process)
