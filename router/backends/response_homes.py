"""Where each stored response lives: the engine that made a `/v1/responses` answer keeps it,
so its follow-ups (GET, DELETE and cancel of `/v1/responses/{id}`, and a new response's
`previous_response_id`) must reach that engine and no other.

`ResponseHomes` learns the answer's `id` from the first bytes of its body (`flow.head`: the
`id` of a JSON answer, or of the `response` of a stream's first event), nothing buffered, and
keeps the newest `capacity` ids. It is a request-events subscriber; the request path reads it
(`home_of`), like the health tracker.

It is per router process: replicas (or `--workers`) do not share it, and a restart forgets
it; `router.api.stored_responses` looks an unknown id up on the engines.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from router.flow import RequestFlow

__all__ = ["CANCEL", "CREATE", "STORED", "Home", "ResponseHomes", "response_id_of"]

CREATE = "/v1/responses"
STORED = "/v1/responses/{response_id}"
CANCEL = "/v1/responses/{response_id}/cancel"
MAX_HOMES = 100_000
"""Response ids remembered (about 200 bytes each); the least recently used go first."""
ID_FIELD = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,200})"')
"""The first `"id"` of an answer: a JSON response object's own, or in a stream the one of the
first event's `response` (no other object with an `id` comes before it)."""


@dataclass(frozen=True, slots=True)
class Home:
    """The backend that stored a response, and the model it answered with."""

    backend_id: str
    model: str


def response_id_of(head: bytes) -> str | None:
    """The response id in the first bytes of a `/v1/responses` answer, if there is one."""
    found = ID_FIELD.search(head)
    return found.group(1).decode() if found else None


class ResponseHomes:
    """A bounded map from response id to the backend that stored it."""

    def __init__(self, capacity: int = MAX_HOMES) -> None:
        self.capacity = capacity
        self._homes: OrderedDict[str, Home] = OrderedDict()

    def home_of(self, response_id: str) -> Home | None:
        home = self._homes.get(response_id)
        if home is not None:
            self._homes.move_to_end(response_id)
        return home

    def remember(self, response_id: str, home: Home) -> None:
        self._homes[response_id] = home
        self._homes.move_to_end(response_id)
        while len(self._homes) > self.capacity:
            self._homes.popitem(last=False)

    def forget(self, response_id: str) -> None:
        self._homes.pop(response_id, None)

    def __len__(self) -> int:
        return len(self._homes)

    # Request events. The id is learned at the first byte, so a client can cancel a
    # background response while its stream still runs, and again at the end in case the
    # first chunk was too short to hold it.

    def on_response(self, flow: RequestFlow) -> None:
        self._learn(flow)

    def on_complete(self, flow: RequestFlow) -> None:
        if flow.endpoint == STORED and flow.method == "DELETE" and flow.status == 200:
            if flow.request is not None:
                self.forget(flow.request.match_info.get("response_id", ""))
            return
        self._learn(flow)

    def _learn(self, flow: RequestFlow) -> None:
        if (flow.endpoint != CREATE or flow.status != 200 or flow.backend is None
                or flow.model is None):
            return
        response_id = response_id_of(flow.head)
        if response_id is not None:
            self.remember(response_id, Home(flow.backend.id, flow.model))

    def __repr__(self) -> str:
        return f"<ResponseHomes {len(self._homes)}/{self.capacity}>"
