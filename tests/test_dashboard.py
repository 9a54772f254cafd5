"""`/dashboard` is one self-contained page, and headless Chromium renders the fleet from it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from router import __version__
from router.config.settings import Config, StaticBackend
from router.keys import CHOOSER, HEALTH, POOL
from router.testing import RunningEngine

from .conftest import MODELS, RouterUnderTest, StartRouter

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it from calling Google's hosts, which this
# machine's closed network refuses (slowly, and many at a time).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
# Virtual time: the page's timers run fast-forward (three refreshes), while network fetches
# to the router pause the clock until they are answered.
VIRTUAL_TIME_MS = 5000
BROWSER_TIMEOUT_S = 60.0

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"browser test needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
)


class RenderedPage(HTMLParser):
    """The DOM as Chromium left it: the backends table by header, the text of elements with
    an id, and every id (to tell markup the page made from markup smuggled in as data)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.rows: list[list[str]] = []
        self.text_by_id: dict[str, str] = {}
        self.ids: list[str] = []
        self._section = ""
        self._cell: list[str] | None = None
        self._open_ids: list[tuple[str, str, list[str]]] = []
        self.feed(dom)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element_id = dict(attrs).get("id")
        if element_id:
            self.ids.append(element_id)
            if tag in ("dd", "span", "p"):
                self._open_ids.append((tag, element_id, []))
        if tag in ("thead", "tbody"):
            self._section = tag
        elif tag == "tr" and self._section == "tbody":
            self.rows.append([])
        elif tag in ("th", "td") and self._section:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("thead", "tbody"):
            self._section = ""
        elif tag in ("th", "td") and self._cell is not None:
            text = " ".join("".join(self._cell).split())
            (self.headers if self._section == "thead" else self.rows[-1]).append(text)
            self._cell = None
        elif self._open_ids and self._open_ids[-1][0] == tag:
            _, element_id, parts = self._open_ids.pop()
            self.text_by_id[element_id] = " ".join("".join(parts).split())

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, parts in self._open_ids:
            parts.append(data)

    def backends(self) -> dict[str, dict[str, str]]:
        """Backend id -> {column header: cell text}."""
        rows = [dict(zip(self.headers, cells, strict=True)) for cells in self.rows]
        return {row["Backend"]: row for row in rows}


async def render(url: str, profile: Path) -> RenderedPage:
    """Load `url` in headless Chromium, let the page refresh, and parse the resulting DOM."""
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so its helpers die with it
    )
    try:
        async with asyncio.timeout(BROWSER_TIMEOUT_S):
            dom, errors = await process.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    assert process.returncode == 0, errors.decode(errors="replace")[-2000:]
    return RenderedPage(dom.decode())


async def test_dashboard_serves_one_self_contained_page(router: RouterUnderTest) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(router.url + "/dashboard") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.headers["Cache-Control"] == "no-cache"
            policy = response.headers["Content-Security-Policy"]
            page = await response.text()
    assert page.startswith("<!doctype html>")
    assert "<table" in page and '<th scope="col">Backend</th>' in page
    # Nothing from another host: no absolute URL at all, no protocol-relative one, and the
    # browser is told to refuse any that slip in.
    assert not re.findall(r"https?://", page, flags=re.IGNORECASE)
    for reference in re.findall(r"""(?:src|href|action)\s*=\s*["']?([^"'\s>]*)""", page):
        assert reference.startswith("data:") or not re.match(r"[a-z]+:|//", reference), reference
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # The data goes into the DOM as text only.
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page


@needs_chromium
async def test_dashboard_renders_every_backend_with_its_health(
    router: RouterUnderTest, engines: list[RunningEngine], tmp_path: Path
) -> None:
    page = await render(router.url + "/dashboard", tmp_path)

    rows = page.backends()
    backends = router.app[POOL].backends
    assert sorted(rows) == sorted(backend.id for backend in backends)
    assert sorted(row["URL"] for row in rows.values()) == sorted(e.url for e in engines)
    for backend in backends:
        row = rows[backend.id]
        assert row["URL"] == backend.url
        assert row["Source"] == "static"
        assert row["Health"] == "✓ Healthy"
        assert row["Breaker"] == "✓ Closed"
        assert row["Probe"] == "✓ OK"
        assert row["KV cache"] == "0 %"  # scraped from the idle engine
        assert row["Running"] == "0" and row["Waiting"] == "0"
    assert page.text_by_id["total-healthy"] == "2 of 2"
    assert page.text_by_id["total-status"] == "healthy"
    assert page.text_by_id["version"] == f"v{__version__}"
    # The policy's repr looks like a tag (`<RoundRobin ...>`): it must arrive as text.
    assert page.text_by_id["total-routing"] == repr(router.app[CHOOSER].policy)
    assert page.text_by_id["connection"] == "Live"


@needs_chromium
async def test_dashboard_marks_a_failing_backend_unavailable_in_words_and_escapes_its_data(
    start_router: StartRouter, engines: list[RunningEngine], tmp_path: Path
) -> None:
    hostile = '<img src="x" id="injected" onerror="document.title=1">'
    up, down = engines
    down.behaviour.health_status = 503
    router = await start_router(Config(
        static_backends=(
            StaticBackend(url=up.url, models=MODELS),
            StaticBackend(url=down.url, models=MODELS, labels=(hostile,)),
        ),
        health_check_interval=0.1,
    ))
    up_id, down_id = (backend.id for backend in router.app[POOL].backends)
    async with asyncio.timeout(5):
        while router.app[HEALTH].state(down_id).probe_ok is not False:
            await asyncio.sleep(0.05)

    page = await render(router.url + "/dashboard", tmp_path)

    rows = page.backends()
    assert rows[up_id]["Health"] == "✓ Healthy"
    assert rows[down_id]["Health"] == "✕ Unavailable"
    assert rows[down_id]["Probe"].startswith("✕ Failed")
    assert page.text_by_id["total-healthy"] == "1 of 2"
    assert rows[down_id]["Models"].endswith(f"labels: {hostile}")
    assert "injected" not in page.ids
