"""The container image carries every optional runtime feature: a chart value that switches
one on (e.g. `otel.endpoint`, tracing) must not meet an image that lacks its packages.
(No Docker engine runs here: the Dockerfile's install line is checked against setup.cfg.)"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVELOPMENT_EXTRAS = {"test", "lint"}


def runtime_extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return set(config["options.extras_require"]) - DEVELOPMENT_EXTRAS


def installed_extras(dockerfile: str) -> set[str]:
    found = re.search(r"pip install '?\.(?:\[([\w,]+)\])?'?", dockerfile)
    assert found, "the Dockerfile does not install the package"
    return set(filter(None, (found.group(1) or "").split(",")))


def test_the_image_installs_every_runtime_extra() -> None:
    extras = runtime_extras()
    assert "otel" in extras
    assert installed_extras((ROOT / "Dockerfile").read_text()) >= extras


def test_the_check_sees_a_missing_extra() -> None:
    assert installed_extras("RUN pip install . \\\n") == set()
    assert installed_extras("RUN pip install '.[otel]' \\\n") == {"otel"}
