"""Secret redaction: the values of secret-bearing names and key-shaped tokens read
`[REDACTED]`, ordinary text is left alone."""

from __future__ import annotations

import pytest

from router.observe.redaction import redact

SECRET = "sk-proj-Zx81QmT5vL0pR2kW9sY4"


@pytest.mark.parametrize("text, kept", [
    (f"Authorization: Bearer {SECRET}", "Authorization: Bearer [REDACTED]"),
    ("authorization=Basic dXNlcjpwYXNzd29yZA==", "authorization=Basic [REDACTED]"),
    (f"{{'Authorization': 'Bearer {SECRET}', 'Host': 'x'}}",
     "{'Authorization': 'Bearer [REDACTED]', 'Host': 'x'}"),
    (f"<CIMultiDictProxy('Proxy-Authorization': 'Bearer {SECRET}')>",
     "<CIMultiDictProxy('Proxy-Authorization': 'Bearer [REDACTED]')>"),
    ('{"api_key": "abc123xyz", "model": "m"}', '{"api_key": "[REDACTED]", "model": "m"}'),
    ("POST /v1/chat/completions?api_key=abc123&id=7",
     "POST /v1/chat/completions?api_key=[REDACTED]&id=7"),
    ("x-api-key: 0123456789abcdef", "x-api-key: [REDACTED]"),
    ("API-KEY=Qwerty", "API-KEY=[REDACTED]"),
    ("apikey: hello", "apikey: [REDACTED]"),
    ("access_token=eyJhbGciOi.eyJzdWIi.sig", "access_token=[REDACTED]"),
    ("client_secret: s3cr3t password=hunter2", "client_secret: [REDACTED] password=[REDACTED]"),
    (f"the key {SECRET} leaked", "the key [REDACTED] leaked"),
    ("token hf_AbCdEfGhIjKlMnOpQr in a message", "token [REDACTED] in a message"),
    ("sent Bearer abcdefghijklmnop upstream", "sent Bearer [REDACTED] upstream"),
    ("İstanbul api_key=abc", "İstanbul api_key=[REDACTED]"),  # lower() changes the length
])
def test_redact_replaces_secret_values(text: str, kept: str) -> None:
    assert redact(text) == kept


@pytest.mark.parametrize("text", [
    "prompt_tokens=12 completion_tokens=4",
    "the bearer of bad news",
    "Authorization header missing",
    "task-1234567 disk-usage=high",
    "backend 1a2b3c4d5e failed: ClientOSError(104, 'Connection reset by peer')",
    "the model `llama-3-8b` does not exist",
])
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text
