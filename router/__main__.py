"""`python -m router` and the `router` command."""

from __future__ import annotations

from collections.abc import Sequence

from router.cli import parse_config
from router.server import run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_config(argv))


if __name__ == "__main__":
    main()
