"""`RequestEvents`: subscribers are called in order, partial ones are fine, failing ones are
logged and skipped."""

from __future__ import annotations

import logging

import pytest

from router.events import RequestEvents
from router.flow import RequestFlow

Calls = list[tuple[str, str, str]]


class Recorder:
    """Implements every event; appends (name, event, flow id) to a shared list."""

    def __init__(self, name: str, calls: Calls) -> None:
        self.name = name
        self.calls = calls

    def on_new(self, flow: RequestFlow) -> None:
        self.calls.append((self.name, "on_new", flow.id))

    def on_response(self, flow: RequestFlow) -> None:
        self.calls.append((self.name, "on_response", flow.id))

    def on_complete(self, flow: RequestFlow) -> None:
        self.calls.append((self.name, "on_complete", flow.id))


class CompleteOnly:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def on_complete(self, flow: RequestFlow) -> None:
        self.calls.append(("complete-only", "on_complete", flow.id))


class Broken:
    """Raises in on_new and on_complete; records on_response."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def on_new(self, flow: RequestFlow) -> None:
        raise RuntimeError("broken on_new")

    def on_response(self, flow: RequestFlow) -> None:
        self.calls.append(("broken", "on_response", flow.id))

    def on_complete(self, flow: RequestFlow) -> None:
        raise KeyError("broken on_complete")


def fire_all(events: RequestEvents, flow: RequestFlow) -> None:
    events.on_new(flow)
    events.on_response(flow)
    events.on_complete(flow)


def test_subscribers_are_called_in_order_for_each_event() -> None:
    calls: Calls = []
    events = RequestEvents([Recorder("first", calls), Recorder("second", calls)])
    events.subscribe(Recorder("third", calls))
    flow = RequestFlow(id="f1", endpoint="/v1/completions")
    fire_all(events, flow)
    assert calls == [
        (name, event, "f1")
        for event in ("on_new", "on_response", "on_complete")
        for name in ("first", "second", "third")
    ]


def test_missing_methods_are_skipped() -> None:
    calls: Calls = []
    events = RequestEvents([object(), CompleteOnly(calls), Recorder("full", calls)])
    fire_all(events, RequestFlow(id="f2", endpoint="/v1/completions"))
    assert calls == [
        ("full", "on_new", "f2"),
        ("full", "on_response", "f2"),
        ("complete-only", "on_complete", "f2"),
        ("full", "on_complete", "f2"),
    ]


def test_failing_subscriber_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: Calls = []
    events = RequestEvents([Recorder("before", calls), Broken(calls), Recorder("after", calls)])
    flow = RequestFlow(id="f3", endpoint="/v1/chat/completions")
    with caplog.at_level(logging.ERROR, logger="router.events"):
        fire_all(events, flow)  # does not raise
    assert calls == [
        ("before", "on_new", "f3"),
        ("after", "on_new", "f3"),
        ("before", "on_response", "f3"),
        ("broken", "on_response", "f3"),
        ("after", "on_response", "f3"),
        ("before", "on_complete", "f3"),
        ("after", "on_complete", "f3"),
    ]
    records = [r for r in caplog.records if r.name == "router.events"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    assert "on_new" in records[0].getMessage() and "f3" in records[0].getMessage()
    assert "on_complete" in records[1].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError
    assert records[1].exc_info is not None and records[1].exc_info[0] is KeyError


def test_a_subscriber_that_fails_every_time_keeps_being_called() -> None:
    class Flaky:
        count = 0

        def on_complete(self, flow: RequestFlow) -> None:
            self.count += 1
            raise ValueError("again")

    flaky = Flaky()
    events = RequestEvents([flaky])
    for n in range(3):
        events.on_complete(RequestFlow(id=f"f{n}", endpoint="/v1/completions"))
    assert flaky.count == 3
