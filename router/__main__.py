"""`python -m router` and the `router` command."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from router.cli import parse_config
from router.server import run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    run(parse_config(args), args)


if __name__ == "__main__":
    main()
