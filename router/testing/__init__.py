"""Test helpers: a fake vLLM engine speaking the OpenAI-compatible API."""

from router.testing.engine.app import RunningEngine, make_engine_app, start_engine
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
    "RunningEngine",
    "Upload",
    "make_engine_app",
    "start_engine",
]
