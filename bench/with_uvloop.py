"""Run a module's `__main__` on uvloop, unchanged: `python -m bench.with_uvloop router ARGS`.

An experiment of the benchmark (`--experiments uvloop`): what uvloop would buy the router
(and the bare floor) without a line of theirs changed. `web.run_app` creates its loop with
`asyncio.new_event_loop()`, which follows the installed policy.
"""

from __future__ import annotations

import asyncio
import runpy
import sys


def main() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
