"""The fake engine's "tokenizer" and output: one token per UTF-8 byte in, "tok0 tok1 ..." out."""

from __future__ import annotations

from typing import Any

from router.testing.engine.state import JsonDict

__all__ = ["completion_text", "count_tokens", "text_of", "token_text", "token_usage", "utf8"]


def token_text(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


def completion_text(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


def text_of(value: Any) -> str:
    """Flatten a prompt / message content / Responses input into plain text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(text_of(item) for item in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return str(value["text"])
        role = value.get("role")
        content = text_of(value.get("content"))
        return f"{role}: {content}" if isinstance(role, str) else content
    if value is None:
        return ""
    return str(value)


def count_tokens(value: Any) -> int:
    """Byte-level "tokenizer": one token per UTF-8 byte (token ids given as ints count 1)."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    return len(utf8(text_of(value)))


def utf8(text: str) -> bytes:
    # surrogatepass: a JSON string may carry lone surrogates ("\ud800").
    return text.encode("utf-8", "surrogatepass")


def token_usage(prompt_tokens: int, completion_tokens: int) -> JsonDict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }
