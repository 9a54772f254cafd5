"""router: a streaming request router for OpenAI-compatible LLM engines."""

__version__ = "0.1.0"
