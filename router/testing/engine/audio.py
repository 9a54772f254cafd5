"""The fake engine's audio endpoints (transcriptions, translations): a multipart upload read
as a stream, its file hashed chunk by chunk, the answer naming its size and hash."""

from __future__ import annotations

import hashlib
import time

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from router.testing.engine.replies import BadRequest, Handler, Sse, dumps, model_of, proxied, reply
from router.testing.engine.state import ENGINE_CONFIG, ENGINE_STATE, Upload
from router.testing.engine.tokens import token_usage

__all__ = ["audio_endpoint", "read_upload"]


_READ_SIZE = 64 * 1024


async def read_upload(request: web.Request, file_names: tuple[str, ...] = ("file",)) -> Upload:
    """Stream a multipart body: hash its file part (named one of `file_names`) chunk by chunk,
    keep the other fields."""
    digest = hashlib.sha256()
    size = 0
    have_file = False
    fields: dict[str, str] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest(400, "Nested multipart bodies are not supported.")
            if part.name in file_names:
                have_file = True
                while chunk := await part.read_chunk(_READ_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
            elif part.name is not None:
                fields[part.name] = await part.text()
            else:
                await part.release()
    except (AssertionError, ValueError, KeyError, HttpProcessingError) as exc:
        raise BadRequest(400, f"Invalid multipart/form-data body: {exc}") from None
    if not have_file:
        raise BadRequest(400, f"Field `{file_names[0]}` is required.")
    return Upload(sha256=digest.hexdigest(), size=size, fields=fields)


def audio_endpoint(kind: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        upload = await read_upload(request)
        request.app[ENGINE_STATE].uploads.append(upload)
        fields = upload.fields
        model = model_of(request, fields.get("model"))
        text = f"{kind} of {upload.size} bytes with sha256 {upload.sha256}"
        if fields.get("stream", "").lower() != "true":
            if fields.get("response_format") == "text":
                return await reply(request, web.Response(text=text))
            return await reply(request, {
                "text": text, "usage": {"type": "duration", "seconds": 1},
            })
        config = request.app[ENGINE_CONFIG]
        head = (
            f'{{"id":"{config.next_id(kind)}","object":"{kind}.chunk",'
            f'"created":{int(time.time())},"model":{dumps(model)},"choices":'
        )
        sse = Sse(request)
        await sse.start()
        words = text.split(" ")
        for i, word in enumerate(words):
            delta = dumps({"content": word if i == 0 else " " + word})
            await sse.data(
                head + '[{"delta":' + delta + ',"finish_reason":null,"stop_reason":null}]}',
                delay=i > 0,
            )
        await sse.data(
            head + '[{"delta":{"content":""},"finish_reason":"stop","stop_reason":null}]}'
        )
        if fields.get("stream_include_usage", "").lower() == "true":
            usage = token_usage(upload.size, len(words))
            await sse.data(head + '[],"usage":' + dumps(usage) + "}")
        return await sse.done()

    handler.__name__ = f"audio_{kind}s"
    return proxied(handler)
