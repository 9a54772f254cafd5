"""Audio through the router to a real vLLM Whisper engine (a tiny one that always answers
"hello"): transcriptions and translations with the `openai` client, streamed answers, a
10-minute upload streamed through without the router holding it, `file` before `model`
(the router spools it), and vLLM's own error for junk audio.
"""

from __future__ import annotations

import array
import json
import math
import urllib.request
import wave
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import WHISPER, Fleet

pytestmark = pytest.mark.e2e

RATE = 16_000


def tone(path: Path, seconds: int) -> Path:
    """A 440 Hz tone, 16 kHz mono 16-bit WAV (32 KB a second)."""
    second = array.array("h", (int(8000 * math.sin(2 * math.pi * 440 * i / RATE))
                               for i in range(RATE)))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        for _ in range(seconds):
            out.writeframes(second.tobytes())
    return path


Part = tuple[str, "str | tuple[str, bytes]"]


def post_multipart(url: str, parts: list[Part]) -> urllib.request.Request:
    """A multipart POST with its parts in this order (a file part is `(filename, bytes)`)."""
    boundary = "e2e-boundary-7d1f"
    pieces = []
    for name, value in parts:
        if isinstance(value, str):
            pieces.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
                          f"\r\n\r\n{value}\r\n".encode())
        else:
            filename, data = value
            pieces += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                       f"filename=\"{filename}\"\r\nContent-Type: audio/wav\r\n\r\n".encode(),
                       data, b"\r\n"]
    pieces.append(f"--{boundary}--\r\n".encode())
    return urllib.request.Request(
        url, data=b"".join(pieces),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.router + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, on translations
def test_transcription_and_translation_with_the_openai_client(fleet: Fleet,
                                                              tmp_path: Path) -> None:
    audio = tone(tmp_path / "two.wav", 2)
    api = client(fleet)
    with audio.open("rb") as file:
        transcript = api.audio.transcriptions.create(model=WHISPER, file=file, language="en")
    assert transcript.text == "hello"
    # The endpoint the router we replace breaks.
    with audio.open("rb") as file:
        translation = api.audio.translations.create(model=WHISPER, file=file)
    assert translation.text == "hello"


@pytest.mark.parametrize("endpoint", ["transcriptions", "translations"])
def test_a_streamed_answer_arrives_event_by_event(fleet: Fleet, tmp_path: Path,
                                                  endpoint: str) -> None:
    audio = tone(tmp_path / "two.wav", 2)
    parts: list[Part] = [("model", WHISPER), ("stream", "true"), ("stream_include_usage", "true"),
                         ("file", ("two.wav", audio.read_bytes()))]
    if endpoint == "transcriptions":
        parts.append(("language", "en"))
    events = []
    request = post_multipart(f"{fleet.router}/v1/audio/{endpoint}", parts)
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    kind = "transcription.chunk" if endpoint == "transcriptions" else "translation.chunk"
    assert {chunk["object"] for chunk in chunks} == {kind}
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks
                   for choice in chunk["choices"])
    assert text == "hello"
    assert [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]
            if choice.get("finish_reason")] == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6  # h e l l o <|endoftext|>


def test_a_ten_minute_upload_streams_through_without_the_router_holding_it(
        fleet: Fleet, tmp_path: Path) -> None:
    audio = tone(tmp_path / "ten-minutes.wav", 600)  # 19.2 MB, under vLLM's 25 MB limit
    before = peak_rss_kib(fleet.router_pid)
    with audio.open("rb") as file:
        transcript = client(fleet).audio.transcriptions.create(model=WHISPER, file=file,
                                                               language="en")
    # vLLM cuts audio into 30 s pieces and answers each one.
    assert transcript.text.split() == ["hello"] * len(transcript.text.split())
    assert len(transcript.text.split()) >= 20
    grown = peak_rss_kib(fleet.router_pid) - before
    print(f"router peak RSS +{grown} KiB for a 19.2 MB upload")
    assert grown < 8 * 1024, f"router peak RSS grew by {grown} KiB for a 19.2 MB upload"


def test_file_before_model_is_still_answered(fleet: Fleet, tmp_path: Path) -> None:
    """The router must know the model to route: with `file` first it spools the file to disk
    until `model` comes, then streams both on in the order they came."""
    audio = tone(tmp_path / "two.wav", 2).read_bytes()
    request = post_multipart(f"{fleet.router}/v1/audio/transcriptions",
                             [("file", ("two.wav", audio)), ("language", "en"),
                              ("model", WHISPER)])
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert json.loads(response.read())["text"] == "hello"


def test_junk_audio_gets_vllms_own_error(fleet: Fleet) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(fleet).audio.transcriptions.create(
            model=WHISPER, file=("notes.wav", b"this is not audio at all", "audio/wav"))
    body = raised.value.response.json()
    assert "audio" in body["error"]["message"].lower(), body  # vLLM's words, passed through
    assert raised.value.response.headers.get("x-request-id")
