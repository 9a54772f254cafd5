"""What some policies read from a request besides its model: a session key, the prompt text.

Only the policies that need them call these (the prompt of a long chat costs microseconds to
assemble). Neither raises: a body of an unexpected shape gives None, and the policy falls back
to load. JSON bodies are whatever clients send, so every field is type-checked before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.proxy.inbound import InboundRequest

__all__ = ["session_key", "prompt_text"]

ESC = "\x1e"
"""Starts every boundary mark in the prompt text. An ESC inside the client's text is doubled,
so text can never pass for a mark: two different message lists never give the same prompt
text (JSON strings can carry any code point, so no bare separator would be safe)."""
ROLE = ESC + "r"
"""Before each message's role."""
CONTENT = ESC + "c"
"""Between a role and the message's text."""
PART = ESC + "p"
"""Between two text parts of one message, or two prompts / inputs of a batch."""
TEXT_PARTS = ("text", "input_text", "output_text")
"""Content part types holding text: chat (`text`) and Responses API (`input_text`...)."""


def session_key(request: InboundRequest, name: str) -> str | None:
    """The client's session key: header `name`, then the same name with `-` and `_` swapped
    (proxies and clients disagree on which one headers may use), then a top-level body field
    under either spelling when it is a non-empty string or an integer. None when absent."""
    swapped = name.replace("-", "\0").replace("_", "-").replace("\0", "_")
    names = (name,) if swapped == name else (name, swapped)
    headers = request.headers
    for key in names:
        value = headers.get(key)
        if value:
            return value
    body = request.json
    if not isinstance(body, dict):
        return None
    for key in names:
        field = body.get(key)
        if isinstance(field, str):
            if field:
                return field
        elif isinstance(field, int) and not isinstance(field, bool):
            return str(field)
    return None


def prompt_text(request: InboundRequest, limit: int | None = None) -> str | None:
    """The text the engine sees first, for prefix matching; at most `limit` characters.

    Chat `messages` (each message's role and text), else `prompt` (a string or a list of
    strings), else Responses-API `instructions` and `input` (a string, strings, or message
    items). None when there is no text: multipart uploads, token ids, unknown shapes.
    Building stops once `limit` is reached, so a huge conversation costs no more than that.
    """
    body = request.json
    if not isinstance(body, dict):
        return None
    budget = limit if limit is not None and limit >= 0 else 1 << 62
    pieces: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        _add_items(pieces, messages, budget, strings=False)
    elif "prompt" in body:
        _add_items(pieces, _as_list(body["prompt"]), budget)
    elif "input" in body:
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            pieces.append(f"{ROLE}instructions{CONTENT}{_escape(instructions)}")
        _add_items(pieces, _as_list(body["input"]), budget)
    text = "".join(pieces)
    if len(text) > budget:
        text = text[:budget]
    return text or None


def _as_list(value: object) -> list[Any]:
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, str) else []


def _add_items(pieces: list[str], items: list[Any], budget: int, strings: bool = True) -> None:
    """Append messages (dicts with `role` and `content`) and, unless told not to, plain
    strings, in order, until the text reaches `budget` characters; anything else (token ids,
    odd values) is skipped. One piece per message: this runs for every message of every
    request, so it avoids calls where it can."""
    size = sum(map(len, pieces))
    for item in items:
        if size >= budget:
            return
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if isinstance(content, str):
                text = content if ESC not in content else _escape(content)
            else:
                text = _parts_text(content)
            if not isinstance(role, str):
                role = ""
            elif ESC in role:
                role = _escape(role)
            if not role and not text:
                continue
            piece = f"{ROLE}{role}{CONTENT}{text}"
        elif strings and isinstance(item, str):
            piece = f"{PART}{_escape(item)}" if pieces else _escape(item)
        else:
            continue
        pieces.append(piece)
        size += len(piece)


def _parts_text(content: object) -> str:
    """The text parts of a message's list of parts, marks between; "" for anything else."""
    if not isinstance(content, list):
        return ""
    texts = [
        _escape(part["text"]) for part in content
        if isinstance(part, dict) and part.get("type") in TEXT_PARTS
        and isinstance(part.get("text"), str)
    ]
    return texts[0] if len(texts) == 1 else PART.join(texts)


def _escape(text: str) -> str:
    return text.replace(ESC, ESC + ESC) if ESC in text else text
