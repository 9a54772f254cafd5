"""`--config FILE`: the same settings as the flags, as YAML or JSON, keys named like the flags.

```yaml
static-backends: [http://10.0.0.7:8000, http://10.0.0.8:8000]
static-models: [[llama-3-8b, qwen-7b], whisper]   # one entry per backend
static-aliases: {gpt-4o: llama-3-8b}
routing-logic: session
```

The file is turned into flag tokens and parsed by the same parser as the command line, with
the command line after it, so flags override the file and every value is checked the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from pathlib import Path

import yaml

from router.config.settings import ConfigError

__all__ = ["read_config_file", "file_tokens"]


def read_config_file(path: str) -> Mapping[str, object]:
    """Read and parse the file (YAML, of which JSON is a subset); blocking: call it at start
    or from a thread."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path}: {error}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top")
    return data


def file_tokens(
    data: Mapping[str, object], parser: argparse.ArgumentParser, path: str,
    overridden: Collection[str] = (),
) -> list[str]:
    """Flag tokens for the file's settings, minus the flags in `overridden` (given on the
    command line); unknown keys and unusable values name the key."""
    options = {
        option: action
        for action in parser._actions  # argparse has no public listing of its options
        for option in action.option_strings
    }
    tokens: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None or flag in ("--config", "--help", "--version"):
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        if value is None or flag in overridden:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"config file {path}: key {key!r} must be true or false")
            tokens += [flag] if value else []
            continue
        tokens += [flag, flag_value(value, key, path)]
    return tokens


def flag_value(value: object, key: object, path: str) -> str:
    if isinstance(value, bool):
        raise ConfigError(f"config file {path}: key {key!r} is not a true/false setting")
    if isinstance(value, Mapping):
        return ",".join(f"{name}:{target}" for name, target in value.items())
    if isinstance(value, list):
        return ",".join(
            ";".join(str(part) for part in item) if isinstance(item, list) else str(item)
            for item in value
        )
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"config file {path}: key {key!r} has an unusable value {value!r}")
