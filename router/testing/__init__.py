"""Test helpers: a fake vLLM engine speaking the OpenAI-compatible API (`engine`), and
around it: misbehaving backends and clients for the chaos suite (`chaos`), a scripted raw
HTTP engine (`raw_engine`), vLLM metrics samples, load floods and child processes."""

from router.testing.engine.app import RunningEngine, make_engine_app, start_engine
from router.testing.engine.kv_events import KvEventPublisher, KvEvents, KvEventsOptions
from router.testing.engine.state import (
    ENGINE_BEHAVIOUR,
    ENGINE_STATE,
    EngineBehaviour,
    EngineState,
    Upload,
)

__all__ = [
    "ENGINE_BEHAVIOUR",
    "ENGINE_STATE",
    "EngineBehaviour",
    "EngineState",
    "KvEventPublisher",
    "KvEvents",
    "KvEventsOptions",
    "RunningEngine",
    "Upload",
    "make_engine_app",
    "start_engine",
]
