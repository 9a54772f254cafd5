"""Fault injection for the chaos suite: backends and clients that misbehave on purpose.

- `backend`: `MisbehavingBackend`, a raw-socket server answering each request with a `Fault`.
- `engine`: `EngineProcess`, the fake engine in a child process (`python -m
  router.testing.chaos`), steered over HTTP, SIGKILLed and restarted.
- `clients`: `call()` sorts an answer into a `Kind`; `leave_*()` clients go away mid-request.
- `tally`: `Tally`, the suite's counts, and `open_fds()` / `rss_kib()` for leak checks.

Everything listens and connects on loopback only, and every wait is bounded.
"""
