"""The prompt's token ids as the engine sees them, from the engine's own `/tokenize`.

Why the engine and not a tokenizer in the router: the cache is keyed by the tokens the engine
renders (its chat template with this request's tools and template arguments, its special
tokens, its tokenizer version), and one token of difference loses every block after it,
silently. The engine renders exactly that, for any model and adapter, with no model files in
the router. The price is one small local round trip, which `timeout` bounds: past it, or on
any failure, the request is routed on load alone.

Only the requests whose tokens can be known are asked for: chat completions (`messages`) and
completions (a text prompt, or token ids, which need no round trip).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from router.backends.pool import Backend
from router.kvcache.events import are_token_ids
from router.proxy.upstream_read import read_bounded

__all__ = ["PromptTokens", "CHAT_FIELDS"]

log = logging.getLogger("router.kvcache")

CHAT_FIELDS: tuple[str, ...] = (
    "messages", "tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents",
)
"""What of a chat request changes its rendered prompt; vLLM's `/tokenize` takes them all."""
COMPLETION_FIELDS = ("prompt", "add_special_tokens")
MAX_ANSWER = 16 * 1024 * 1024


class PromptTokens:
    """Asks an engine for a request's prompt tokens, within `timeout` seconds."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.asked = 0
        self.failed = 0

    async def tokens(
        self, body: dict[str, Any], model: str, endpoint: str, backend: Backend,
    ) -> list[int] | None:
        """The prompt's token ids, or None (not a prompt we can tokenize, or it failed)."""
        if endpoint == "/v1/chat/completions":
            if not isinstance(body.get("messages"), list):
                return None
            fields = CHAT_FIELDS
        elif endpoint == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and are_token_ids(prompt):
                return prompt  # token ids already
            if not isinstance(prompt, str):
                return None  # a batch of prompts is spread by load
            fields = COMPLETION_FIELDS
        else:
            return None
        query = {name: body[name] for name in fields if name in body}
        query["model"] = model
        self.asked += 1
        try:
            async with self.session.post(
                backend.url + "/tokenize", data=json.dumps(query),
                headers={"Content-Type": "application/json"},
                timeout=self.timeout, allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                answer = json.loads(await read_bounded(response, MAX_ANSWER, "/tokenize"))
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            if not isinstance(tokens, list):
                raise ValueError("no list of token ids in the answer")
            # Not checked item by item (that cost more than the hashing): values that are
            # no ints only hash to blocks no engine holds, and unhashable ones are caught
            # where the blocks are hashed.
            return tokens
        except Exception as exc:  # any failure routes on load; never fails the request
            self.failed += 1
            log.debug("kv events: tokenizing on backend %s failed: %r", backend.id, exc)
            return None
