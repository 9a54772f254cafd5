"""Backend health: a circuit breaker per backend fed by the request events, and active probes.

Two signals decide whether a backend may take a request (`HealthTracker.available`):

- The breaker sees real traffic. Consecutive failures the backend caused (5xx, connection
  errors, timeouts) open it; after a cooldown it lets one trial request through, whose result
  closes it again or restarts the cooldown. What the client or the router caused (a client
  that left, a 400 for a too-long prompt, a 429) never counts: a breaker that trips on those
  turns one bad client into an outage (a context-length 400 counted as a worker failure
  has emptied a fleet in production).
- The prober GETs every backend's `/health` (an external provider's `/v1/models`, with its
  key: it has no `/health`, and a bad key must show). A clear "no" (a status other than 200,
  a refused connection) removes the backend at once; silence (a timeout) only on the second
  probe in a row. A passing probe only lifts the probe's own veto (see
  `HealthTracker.record_probe`).

The breakers may hold out at most `max_ejection_percent` of a model's backends that the
probes do not fail, and never the last one (`HealthTracker.routable`, as Envoy's
`max_ejection_percent`): faults of requests (a poison prompt answered with 500s, cut streams,
hangs) reach every engine alike and would otherwise open every breaker of a healthy fleet.
A backend the cap keeps routable closes at its first good answer, and that answer ends the
cooldown of the model's other open breakers (`HealthTracker._end_cooldowns`).

Neither touches load counters: health says yes or no, the policies weigh the load (a health
checker that zeroed load counters made cache-aware routing pile onto hot spots).
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import aiohttp

from router.backends.pool import Backend, BackendPool
from router.errors import failure_detail
from router.flow import Outcome, RequestFlow

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Verdict",
    "classify",
    "BackendHealth",
    "HealthTracker",
    "HealthProber",
]

log = logging.getLogger("router.health")

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    """Requests flow; consecutive failures are counted."""
    OPEN = "open"
    """No request goes through until the cooldown has passed."""
    HALF_OPEN = "half_open"
    """One trial request at a time goes through; its result decides."""


def check_settings(failure_threshold: int, cooldown: float) -> None:
    if failure_threshold < 1:
        raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
    if cooldown < 0:
        raise ValueError(f"cooldown must not be negative, not {cooldown}")


class CircuitBreaker:
    """The breaker of one backend.

    Results carry a token (the request's flow) so that a trial is recognised when it ends:
    while open or half-open, only the trial's result moves the breaker. The others are
    stragglers, admitted before the breaker opened, and say nothing about the backend now.
    """

    __slots__ = (
        "name", "failure_threshold", "cooldown", "consecutive_failures", "opened_at",
        "_state", "_trial", "_clock",
    )

    def __init__(
        self, failure_threshold: int, cooldown: float, clock: Clock = time.monotonic,
        name: str = "",
    ) -> None:
        check_settings(failure_threshold, cooldown)
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        """Clock time the breaker last opened; None while closed."""
        self._state = BreakerState.CLOSED
        self._trial: object | None = None
        self._clock = clock

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose cooldown has passed reads as half-open."""
        if self._state is BreakerState.OPEN:
            self._refresh()
        return self._state

    @property
    def trial_in_flight(self) -> bool:
        return self._trial is not None

    def allows(self) -> bool:
        """True when a request may go through now: closed, or half-open with no trial."""
        if self._state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.HALF_OPEN and self._trial is None

    def start_trial(self, token: object, early: bool = False) -> bool:
        """Make the request `token` the trial if the breaker is half-open without one.

        `early`: while still open too. A request sent to an open backend anyway (the ejection
        cap keeps it routable) tells as much as one sent after the cooldown, so its answer may
        as well close the breaker."""
        if self._trial is not None:
            return False
        state = self.state
        if state is not BreakerState.HALF_OPEN and not (early and state is BreakerState.OPEN):
            return False
        self._trial = token
        return True

    def is_trial(self, token: object) -> bool:
        return self._trial is not None and self._trial is token

    def success(self, token: object = None) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self.consecutive_failures = 0
        elif self.is_trial(token):
            self._trial = None
            self._state = BreakerState.CLOSED
            self.consecutive_failures = 0
            self.opened_at = None
            log.info("circuit breaker %s closed: the trial request succeeded", self.name)

    def failure(self, token: object = None) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold:
                self._open()
                log.warning("circuit breaker %s opened after %d consecutive failures",
                            self.name, self.consecutive_failures)
        elif self.is_trial(token):
            self._trial = None
            self.consecutive_failures += 1
            self._open()
            log.warning("circuit breaker %s reopened: the trial request failed", self.name)

    def release(self, token: object) -> None:
        """The request `token` ended with no verdict: if it was the trial, the next one is."""
        if self.is_trial(token):
            self._trial = None

    def end_cooldown(self) -> bool:
        """Turn an open breaker without a trial half-open now; True if it was one."""
        if self.state is not BreakerState.OPEN or self._trial is not None:
            return False
        self._state = BreakerState.HALF_OPEN
        return True

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self.opened_at = self._clock()

    def _refresh(self) -> None:
        assert self.opened_at is not None
        if self._clock() - self.opened_at >= self.cooldown:
            self._state = BreakerState.HALF_OPEN

    def __repr__(self) -> str:
        state = self.state
        detail = f"failures={self.consecutive_failures}/{self.failure_threshold}"
        if state is BreakerState.OPEN:
            assert self.opened_at is not None
            left = self.cooldown - (self._clock() - self.opened_at)
            detail += f" half_open_in={left:.1f}s"
            if self._trial is not None:
                detail += " trial=in_flight"
        elif state is BreakerState.HALF_OPEN:
            detail += " trial=" + ("in_flight" if self._trial is not None else "none")
        name = f" {self.name}" if self.name else ""
        return f"<CircuitBreaker{name} {state.name} {detail}>"


class Verdict(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"
    """Says nothing about the backend: neither counts, but a trial ends."""


BACKEND_FAULTS = frozenset({Outcome.BACKEND_ERROR, Outcome.TIMEOUT})
ROUTER_SIDE = frozenset({Outcome.REJECTED, Outcome.ROUTER_ERROR})


def classify(flow: RequestFlow) -> Verdict:
    """What a completed request says about the health of `flow.backend`."""
    outcome, status = flow.outcome, flow.status
    if outcome is Outcome.TIMEOUT and flow.t_headers is None:
        # The engine took the request and did not answer within --response-timeout: a long
        # generation or a long queue, which says it is busy, not broken (the prober catches
        # a dead one). Counted, it would open busy engines' breakers and pile their load on
        # the others exactly when there is none to spare.
        return Verdict.NEUTRAL
    if outcome in BACKEND_FAULTS:
        return Verdict.FAILURE
    if outcome in ROUTER_SIDE:
        # The router's own refusal or bug; its 500 is not the backend's.
        return Verdict.NEUTRAL
    if status is not None and status >= 500:
        # Only the backend sets a 5xx on the other outcomes (a client that left gets 499),
        # and its 503 stays true when the client leaves while reading it.
        return Verdict.FAILURE
    if outcome is Outcome.OK and status is not None and status < 400:
        return Verdict.SUCCESS
    # 4xx (a too-long prompt, a 429 under load) is the client's problem or load, not a dead
    # backend; a client that left or a shutdown tells nothing either.
    return Verdict.NEUTRAL


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """One backend's health, for `/engines` and metrics."""

    backend_id: str
    available: bool
    """What the request path sees now (`HealthTracker.available`)."""
    breaker: str
    """`closed`, `open` or `half_open`."""
    consecutive_failures: int
    trial_in_flight: bool
    opened_at: float | None
    """Clock time (`time.monotonic()`) the breaker last opened; None while closed."""
    probe_ok: bool | None
    """The last probe verdict; None before the first one."""
    last_probe_error: str | None
    """Why the last failed probe failed; kept after a recovery, for diagnosis."""
    probed_at: float | None
    """Clock time of the last probe verdict."""


class _Entry:
    __slots__ = ("breaker", "models", "probe_ok", "probe_error", "probed_at")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.models: tuple[str, ...] = ()
        """The models the backend serves, as last routed to (for `_end_cooldowns`)."""
        self.probe_ok: bool | None = None
        self.probe_error: str | None = None
        self.probed_at: float | None = None


def _ejection(breaker: CircuitBreaker, backend: Backend) -> tuple[int, float, Backend]:
    return breaker.consecutive_failures, -(breaker.opened_at or 0.0), backend


def _put_back_order(item: tuple[int, float, Backend]) -> tuple[int, float]:
    return item[0], item[1]


class HealthTracker:
    """Subscriber: breakers and probe verdicts per backend id; the request path asks
    `routable(backends of the model)`.

    A backend it knows nothing about is available: health checks may be off, and a backend
    is assumed well until a probe or a request says otherwise.
    """

    def __init__(
        self, failure_threshold: int, cooldown: float, clock: Clock = time.monotonic,
        max_ejection_percent: int = 50,
    ) -> None:
        check_settings(failure_threshold, cooldown)
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be within 0..100, "
                             f"not {max_ejection_percent}")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.max_ejection_percent = max_ejection_percent
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def available(self, backend: Backend) -> bool:
        """True when `backend`'s own health admits a request now: its probe does not fail and
        its breaker admits one. Whether it is routed to is `routable`'s call."""
        entry = self._entries.get(backend.id)
        if entry is None:
            return True
        if entry.probe_ok is False:
            return False
        breaker = entry.breaker
        # The closed check inlined: it saves a method call on nearly every call.
        return breaker._state is BreakerState.CLOSED or breaker.allows()

    def routable(
        self, backends: Sequence[Backend], exclude: Collection[str] = ()
    ) -> list[Backend]:
        """The backends of one model (`backends`, in their order) that may take a request now,
        minus the ids in `exclude`.

        Those `available`, and the breaker-ejected ones the ejection cap puts back (see
        `kept_by_cap`). A backend whose probe fails stays out whatever the cap says. Runs on
        every request: one pass, and no allocation but the answer's while no breaker holds a
        backend out.
        """
        entries = self._entries
        chosen: list[Backend] = []
        ejected: list[tuple[int, float, Backend]] | None = None
        alive = 0
        for backend in backends:
            entry = entries.get(backend.id)
            if entry is not None:
                if entry.probe_ok is False:
                    continue
                breaker = entry.breaker
                if breaker._state is not BreakerState.CLOSED and not breaker.allows():
                    alive += 1
                    if ejected is None:
                        ejected = []
                    ejected.append(_ejection(breaker, backend))
                    continue
            alive += 1
            if backend.id not in exclude:
                chosen.append(backend)
        if ejected is None:
            return chosen
        kept = self._put_back(ejected, alive)
        if not kept:
            return chosen
        keep = set(chosen)
        keep.update(backend for backend in kept if backend.id not in exclude)
        return [backend for backend in backends if backend in keep]

    def kept_by_cap(self, backends: Sequence[Backend]) -> list[Backend]:
        """The backends of one model routed to although their breaker holds them out; empty
        while the cap does not bite.

        The cap: breakers may hold out at most `max_ejection_percent` (rounded down) of the
        model's backends that the probes do not fail (all of them while probes are off), so
        below 100 never the last one. Past it, as many are put back as it takes: first those
        with the fewest consecutive failures, then the latest ejected (the first to go is the
        likeliest to be really broken; the next ones often only took its load), then in pool
        order, so every request puts back the same ones.
        """
        alive = 0
        ejected: list[tuple[int, float, Backend]] = []
        for backend in backends:
            entry = self._entries.get(backend.id)
            if entry is not None and entry.probe_ok is False:
                continue
            alive += 1
            if entry is not None and not entry.breaker.allows():
                ejected.append(_ejection(entry.breaker, backend))
        return self._put_back(ejected, alive)

    def _put_back(self, ejected: list[tuple[int, float, Backend]], alive: int) -> list[Backend]:
        extra = len(ejected) - alive * self.max_ejection_percent // 100
        if extra <= 0:
            return []
        ejected.sort(key=_put_back_order)  # stable: ties stay in pool order
        return [item[2] for item in ejected[:extra]]

    # Entries are made only where the backend is known to be in the pool (routed to, probed):
    # a late `on_complete` after `forget` must not bring a removed backend back for good.

    def _entry(self, backend_id: str) -> _Entry:
        entry = self._entries.get(backend_id)
        if entry is None:
            breaker = CircuitBreaker(self.failure_threshold, self.cooldown, self._clock,
                                     name=backend_id)
            entry = self._entries[backend_id] = _Entry(breaker)
        return entry

    # A request that reaches a backend whose breaker is not closed and runs no trial is its
    # trial: after the cooldown, or before it when the ejection cap kept the backend routable
    # (nothing else routes to an open breaker), so a recovered backend closes at its first
    # good answer.

    def on_new(self, flow: RequestFlow) -> None:
        if flow.backend is not None:
            self._start(flow.backend, flow)

    def _start(self, backend: Backend, flow: RequestFlow) -> None:
        entry = self._entry(backend.id)
        entry.models = backend.models
        entry.breaker.start_trial(flow, early=True)

    def _succeed(self, entry: _Entry, flow: RequestFlow) -> None:
        breaker = entry.breaker
        # Read before `success` closes it: an open breaker's trial is one the cap sent.
        early = breaker.is_trial(flow) and breaker.state is BreakerState.OPEN
        breaker.success(flow)
        if early and flow.model is not None:
            self._end_cooldowns(flow.model)

    def _end_cooldowns(self, model: str) -> None:
        """A backend the ejection cap kept answered well before its cooldown ended: the
        faults that opened its breaker were the requests', and likely those that opened
        the other breakers of the model too. Each gets its trial now rather than after its
        cooldown, so the model is back to full capacity within a few requests; one that
        really is broken fails that one trial and starts a new cooldown."""
        for backend_id, entry in self._entries.items():
            if model in entry.models and entry.breaker.end_cooldown():
                log.info("circuit breaker %s half-open early: another backend of %s held out "
                         "with it answered again", backend_id, model)

    def on_retry(self, flow: RequestFlow) -> None:
        attempt = flow.attempts[-1]
        entry = self._entries.get(attempt.backend.id)
        if entry is not None:
            if attempt.outcome in BACKEND_FAULTS:
                entry.breaker.failure(flow)
            else:
                entry.breaker.release(flow)
        if flow.backend is not None:
            self._start(flow.backend, flow)

    def on_response(self, flow: RequestFlow) -> None:
        # A trial that is streaming a good answer has proved the point; waiting for the end
        # of a long generation would keep the backend to one request for minutes.
        if flow.backend is None or flow.status is None or flow.status >= 400:
            return
        entry = self._entries.get(flow.backend.id)
        if entry is not None and entry.breaker.is_trial(flow):
            self._succeed(entry, flow)

    def on_complete(self, flow: RequestFlow) -> None:
        if flow.backend is None:
            return
        entry = self._entries.get(flow.backend.id)
        if entry is None:
            return
        verdict = classify(flow)
        if verdict is Verdict.FAILURE:
            entry.breaker.failure(flow)
        elif verdict is Verdict.SUCCESS:
            self._succeed(entry, flow)
        else:
            entry.breaker.release(flow)

    def record_probe(self, backend_id: str, ok: bool, error: str | None = None) -> None:
        """The prober's verdict on `backend_id`.

        A failing probe vetoes the backend at once. A passing probe lifts only that veto and
        leaves an open breaker to its cooldown and trial: `/health` is good at saying a
        backend is dead (refused, 503) and poor at saying it serves (vLLM's answers 200 while
        every generation fails with a CUDA error). If a green probe closed the breaker, such a
        backend would cost `failure_threshold` failed requests every probe interval instead
        of one trial per cooldown.
        """
        entry = self._entry(backend_id)
        if ok != entry.probe_ok:
            if not ok:
                log.warning("backend %s failed its health probe: %s", backend_id, error)
            elif entry.probe_ok is False:
                log.info("backend %s passes its health probe again", backend_id)
        entry.probe_ok = ok
        entry.probed_at = self._clock()
        if not ok:
            entry.probe_error = error or "probe failed"

    def state(self, backend_id: str) -> BackendHealth:
        entry = self._entries.get(backend_id)
        if entry is None:
            return BackendHealth(
                backend_id=backend_id, available=True, breaker=BreakerState.CLOSED.value,
                consecutive_failures=0, trial_in_flight=False, opened_at=None, probe_ok=None,
                last_probe_error=None, probed_at=None,
            )
        breaker = entry.breaker
        return BackendHealth(
            backend_id=backend_id,
            available=entry.probe_ok is not False and breaker.allows(),
            breaker=breaker.state.value,
            consecutive_failures=breaker.consecutive_failures,
            trial_in_flight=breaker.trial_in_flight,
            opened_at=breaker.opened_at,
            probe_ok=entry.probe_ok,
            last_probe_error=entry.probe_error,
            probed_at=entry.probed_at,
        )

    def forget(self, backend_id: str) -> None:
        """Drop what is known about a backend that left the pool."""
        self._entries.pop(backend_id, None)

    def __repr__(self) -> str:
        down = sum(
            1 for entry in self._entries.values()
            if entry.probe_ok is False or not entry.breaker.allows()
        )
        return f"<HealthTracker backends={len(self._entries)} unavailable={down}>"


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
