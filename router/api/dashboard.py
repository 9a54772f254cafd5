"""`GET /dashboard`: the status page, one self-contained HTML file served from memory.

The page polls `engines` and `health` every 2 s by relative URL (so it works behind a path
prefix) and writes what they say with `textContent` only. The file is read once, at import,
never in a handler. Its Content-Security-Policy admits exactly the page's own inline script and
style and requests to this origin: a slip in the page can neither load nor send anything
elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

from router.api.middleware import expect_handler

__all__ = ["add_routes"]

PAGE = resources.files("router.api").joinpath("dashboard.html").read_bytes()


def _inline_sources(page: str, tag: str) -> str:
    """CSP hash sources for the bodies of the page's attribute-less `<tag>` elements."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    digests = (hashlib.sha256(body.encode()).digest() for body in bodies)
    return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)


_TEXT = PAGE.decode()
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    # Revalidate every time: a new router version must not be shown the old page.
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; "
        f"script-src {_inline_sources(_TEXT, 'script')}; "
        f"style-src {_inline_sources(_TEXT, 'style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, headers=HEADERS)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", dashboard, expect_handler=expect_handler)
