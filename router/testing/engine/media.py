"""The fake engine's media endpoints: speech (JSON in, audio bytes out, in several writes) and
images (generations: JSON; edits: a multipart upload read as a stream). Each answer names what
it was given, so a test sees the request arrive whole."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

from aiohttp import web

from router.testing.engine.audio import read_upload
from router.testing.engine.replies import BadRequest, model_of, proxied, read_json, reply
from router.testing.engine.state import ENGINE_BEHAVIOUR, ENGINE_STATE

__all__ = ["SPEECH_CHUNKS", "images_edits", "images_generations", "speech", "speech_audio"]

SPEECH_CHUNKS = 4
"""Writes of one speech answer (a token delay apart): a client can hear it start early."""
AUDIO_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "opus": "audio/ogg",
               "aac": "audio/aac", "flac": "audio/flac", "pcm": "audio/pcm"}


def speech_audio(text: str, voice: str) -> bytes:
    """The fake audio of `text` in `voice`: 2 KiB derived from both."""
    return hashlib.sha256(f"{voice}:{text}".encode()).digest() * 64


@proxied
async def speech(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model_of(request, body.get("model"))
    text, voice = body.get("input"), body.get("voice", "alloy")
    if not isinstance(text, str) or not isinstance(voice, str):
        raise BadRequest(400, "Fields `input` and `voice` must be strings.")
    audio = speech_audio(text, voice)
    content_type = AUDIO_TYPES.get(str(body.get("response_format", "mp3")), "audio/mpeg")
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    step = len(audio) // SPEECH_CHUNKS
    delay = request.app[ENGINE_BEHAVIOUR].token_delay
    for i in range(SPEECH_CHUNKS):
        if i and delay > 0:
            await asyncio.sleep(delay)
        await response.write(audio[i * step:(i + 1) * step])
    await response.write_eof()
    return response


def _image(description: str, response_format: object) -> dict[str, str]:
    if response_format == "url":
        digest = hashlib.sha256(description.encode()).hexdigest()[:16]
        return {"url": f"https://images.invalid/{digest}.png", "revised_prompt": description}
    return {"b64_json": base64.b64encode(description.encode()).decode(),
            "revised_prompt": description}


@proxied
async def images_generations(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model_of(request, body.get("model"))
    prompt, n = body.get("prompt"), body.get("n", 1)
    if not isinstance(prompt, str) or not isinstance(n, int) or not 1 <= n <= 10:
        raise BadRequest(400, "`prompt` must be a string and `n` between 1 and 10.")
    data = [_image(f"image {i} of {prompt}", body.get("response_format")) for i in range(n)]
    return await reply(request, {"created": int(time.time()), "data": data})


@proxied
async def images_edits(request: web.Request) -> web.StreamResponse:
    upload = await read_upload(request, ("image", "image[]"))
    request.app[ENGINE_STATE].uploads.append(upload)
    fields = upload.fields
    model_of(request, fields.get("model"))
    description = (f"edit of {upload.size} bytes with sha256 {upload.sha256}: "
                   f"{fields.get('prompt', '')}")
    return await reply(request, {"created": int(time.time()),
                                 "data": [_image(description, fields.get("response_format"))]})
