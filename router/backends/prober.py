"""The active prober: a background task that probes every backend and tells the tracker.

It GETs every backend's `/health` (an external provider's `/v1/models`, with its key: it has no
`/health`, and a bad key must show). A clear "no" (a status other than 200, a refused
connection) removes the backend at once; silence (a timeout) only on the second probe in a row.
A passing probe only lifts the probe's own veto (see `HealthTracker.record_probe`). With
`--static-backend-health-checks` the probe is the smallest real request of the model's type.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass

import aiohttp

from router.backends.pool import Backend, BackendPool
from router.backends.tracker import HealthTracker
from router.errors import failure_detail

__all__ = ["HealthProber", "MODEL_TYPES", "model_probe", "silent_wav"]

log = logging.getLogger("router.health")


EXTERNAL_PROBE_PATH = "/v1/models"
"""Where an external provider is probed (as production-stack does): cheap, free, and it
checks the key too."""

SILENT_STRIKES = 2
"""Consecutive probes without an answer (timeout, dropped connection) that eject a backend.

An answer that says no (a non-200 status, a refused connection) ejects at once: the engine
itself says it cannot serve, or nothing listens. Silence is different: a busy engine's API
server can miss one probe's deadline while it streams fine (liveness probes that time out
under load have restarted healthy routers). One missed deadline is noise; two in a row,
an interval apart, is an engine that stopped answering."""


@dataclass(frozen=True, slots=True)
class _ProbeResult:
    ok: bool
    error: str | None = None
    silent: bool = False
    """No answer at all: timed out, or the connection dropped before a status."""


MODEL_TYPES = ("chat", "completion", "embeddings", "rerank", "score", "transcription")


def silent_wav(samples: int = 1600) -> bytes:
    """A 16 kHz mono 16-bit WAV of silence (0.1 s by default): the smallest transcription
    request a real engine decodes without complaint."""
    data = bytes(2 * samples)
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16,
                         1, 1, 16000, 32000, 2, 16, b"data", len(data))
    return header + data


SILENT_WAV = silent_wav()


def model_probe(model_type: str, model: str) -> tuple[str, aiohttp.FormData | bytes]:
    """The path and body of the smallest real request of a model type (production-stack's
    `--static-backend-health-checks`)."""
    if model_type == "transcription":
        form = aiohttp.FormData()
        form.add_field("model", model)
        form.add_field("file", SILENT_WAV, filename="probe.wav", content_type="audio/wav")
        return "/v1/audio/transcriptions", form
    requests: dict[str, tuple[str, dict[str, object]]] = {
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 1}),
        "completion": ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        "embeddings": ("/v1/embeddings", {"input": "hi"}),
        "rerank": ("/v1/rerank", {"query": "hi", "documents": ["hi"]}),
        "score": ("/v1/score", {"text_1": "hi", "text_2": "hi"}),
    }
    path, body = requests[model_type]
    return path, json.dumps({"model": model, **body}).encode()


class HealthProber:
    """GETs every backend's health path each `interval` seconds and tells the tracker.

    Give it a session of its own: on the requests' session a probe would queue behind busy
    requests for a pool slot and time out exactly when the backend is busiest.
    """

    def __init__(
        self,
        tracker: HealthTracker,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        interval: float,
        path: str,
        timeout: float,
    ) -> None:
        self.tracker = tracker
        self.pool = pool
        self.session = session
        self.interval = interval
        self.path = path if path.startswith("/") else "/" + path
        self.timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self._silent: dict[str, int] = {}
        """Consecutive unanswered probes per backend id."""

    async def probe_once(self) -> None:
        """Probe every backend in the pool concurrently and record the verdicts; never raises."""
        backends = self.pool.backends
        results = await asyncio.gather(*(self._probe(backend) for backend in backends))
        # The pool may have changed while the probes ran: record only backends still in it,
        # so that a removed (and forgotten) backend does not come back into the tracker.
        current = {backend.id for backend in self.pool.backends}
        for backend_id in [bid for bid in self._silent if bid not in current]:
            del self._silent[backend_id]
        for backend, result in zip(backends, results):
            if backend.id in current:
                self._record(backend.id, result)

    def _record(self, backend_id: str, result: _ProbeResult) -> None:
        if not result.silent:
            self._silent.pop(backend_id, None)
            self.tracker.record_probe(backend_id, result.ok, result.error)
            return
        strikes = self._silent[backend_id] = self._silent.get(backend_id, 0) + 1
        if strikes >= SILENT_STRIKES:
            self.tracker.record_probe(backend_id, False, result.error)
        else:
            log.info("backend %s: health probe unanswered (%s); ejected if the next one is too",
                     backend_id, result.error)

    async def _probe(self, backend: Backend) -> _ProbeResult:
        path, data = self.path, None
        if backend.kind == "external":
            path = EXTERNAL_PROBE_PATH
        elif backend.model_type is not None and backend.models:
            # --static-backend-health-checks: a minimal real request of the model's type.
            path, data = model_probe(backend.model_type, backend.models[0])
        try:
            async with self.session.request(
                "GET" if data is None else "POST", backend.url + path, data=data,
                timeout=self._client_timeout, allow_redirects=False,
                # An external provider's Authorization replaces the fleet key this session
                # sends by default.
                headers=backend.headers or None,
            ) as response:
                if response.status == 200:
                    return _ProbeResult(True)
                return _ProbeResult(False, f"HTTP {response.status} from {path}")
        except TimeoutError:
            return _ProbeResult(False, f"no answer within {self.timeout:g}s",
                                silent=True)
        except aiohttp.ClientConnectorError as error:
            return _ProbeResult(False, f"cannot connect: {failure_detail(error)}")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientPayloadError) as error:
            return _ProbeResult(False, f"connection lost: {failure_detail(error)}", silent=True)
        except Exception as error:
            return _ProbeResult(False, failure_detail(error))

    async def run(self) -> None:
        """Probe, sleep `interval`, forever; cancel the task to stop it."""
        while True:
            try:
                await self.probe_once()
            except Exception:
                # A dead prober would leave every verdict frozen; keep going and say why.
                log.exception("health probe round failed")
            await asyncio.sleep(self.interval)

    def __repr__(self) -> str:
        return (f"<HealthProber backends={len(self.pool.backends)} path={self.path} "
                f"interval={self.interval:g}s timeout={self.timeout:g}s>")
