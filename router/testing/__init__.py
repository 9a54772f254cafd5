"""Test helpers: a fake vLLM engine speaking the OpenAI-compatible API."""

from router.testing.engine import (
    ENGINE_BEHAVIOUR,
    ENGINE_STATE,
    EngineBehaviour,
    EngineState,
    RunningEngine,
    Upload,
    make_engine_app,
    start_engine,
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
