"""External providers (`--external-providers-config FILE`): hosted OpenAI-compatible APIs
served beside the local fleet, configured in production-stack's file format.

```yaml
external_providers:
  - name: openai
    type: openai                      # the one type: any OpenAI-compatible API
    api_base: https://api.openai.com  # request paths (/v1/chat/completions) go after it
    api_key_env_var: OPENAI_API_KEY   # the default
    timeout: 30                       # seconds to the first byte and between chunks
    max_retries: 3                    # same-provider retries when it cannot be reached
    custom_headers: {OpenAI-Organization: org-123}
    models:
      - id: gpt-4o
        type: chat
        aliases: [gpt4o]
```

Each provider becomes one backend of kind `external` serving its model ids. Every request to
it carries the provider's key as `Authorization: Bearer` and its custom headers; the client's
credentials never go to a provider. Aliases join the pool's, so `gpt4o` reaches the provider
as `gpt-4o`. The file and the keys are read once, when the configuration is loaded (blocking:
`router.config.load` does it before the event loop starts, a reload from a thread).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from router.backends.pool import Backend, parse_url
from router.config.settings import (
    DEFAULT_MAX_RETRIES, DEFAULT_MODEL_TYPE, ConfigError, ExternalModel, ExternalProvider,
)
from router.proxy.headers import SET_BY_ROUTER

__all__ = [
    "ExternalModel",
    "ExternalProvider",
    "load_external_providers",
    "parse_external_providers",
    "external_backends",
    "merge_aliases",
]

FLAG = "--external-providers-config"
TOP_KEY = "external_providers"
PROVIDER_KEYS = (
    "name", "type", "api_base", "api_key_env_var", "timeout", "max_retries", "custom_headers",
    "models",
)
MODEL_KEYS = ("id", "type", "aliases")
PROVIDER_TYPES = ("openai",)
DEFAULT_KEY_VARIABLE = "OPENAI_API_KEY"
"""production-stack's default for an `openai` provider without `api_key_env_var`."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
"""A provider's name is its backend id: it appears in headers, metric labels and `?id=`."""
FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
"""An HTTP field name (RFC 9110 token)."""


def load_external_providers(
    path: str, environ: Mapping[str, str]
) -> tuple[ExternalProvider, ...]:
    """Read and validate the file and the keys it names; raises `ConfigError` naming the key.
    Blocking: call it at start or from a thread."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"argument {FLAG}: {path}: {error}".replace("\n", " ")) from None
    return parse_external_providers(data, environ, f"external providers config {path}")


def parse_external_providers(
    data: object, environ: Mapping[str, str], source: str = "external providers config"
) -> tuple[ExternalProvider, ...]:
    """The providers in `data` (the parsed file), with their keys from `environ`."""
    if not isinstance(data, Mapping):
        _fail(source, "", f"expected a mapping with the key {TOP_KEY!r} at the top")
    _known_keys(source, "", data, (TOP_KEY,))
    items = data.get(TOP_KEY)
    if not isinstance(items, list) or not items:
        _fail(source, TOP_KEY, "expected a non-empty list of providers")
    providers = tuple(
        _provider(source, f"{TOP_KEY}[{number}]", item, environ)
        for number, item in enumerate(items)
    )
    _check_unique(source, providers)
    return providers


def _provider(
    source: str, where: str, item: object, environ: Mapping[str, str]
) -> ExternalProvider:
    if not isinstance(item, Mapping):
        _fail(source, where, "expected a mapping of provider settings")
    _known_keys(source, where, item, PROVIDER_KEYS)
    name = _string(source, f"{where}.name", item.get("name"))
    if not NAME.match(name):
        _fail(source, f"{where}.name", f"{name!r} is not a name: use letters, digits, '.', "
                                       "'_' and '-', starting with a letter or digit")
    kind = _string(source, f"{where}.type", item.get("type"))
    if kind not in PROVIDER_TYPES:
        _fail(source, f"{where}.type", f"unknown provider type {kind!r} (known: "
                                       f"{', '.join(PROVIDER_TYPES)})")
    api_base = _string(source, f"{where}.api_base", item.get("api_base"))
    try:
        url = parse_url(api_base)
    except ValueError as error:
        _fail(source, f"{where}.api_base", str(error))
    url = url.removesuffix("/v1")
    variable = item.get("api_key_env_var")
    variable = DEFAULT_KEY_VARIABLE if variable is None else _string(
        source, f"{where}.api_key_env_var", variable)
    api_key = environ.get(variable, "")
    if not api_key:
        _fail(source, f"{where}.api_key_env_var",
              f"environment variable {variable} is not set (or empty): provider {name!r} "
              "needs its API key there")
    return ExternalProvider(
        name=name,
        url=url,
        models=_models(source, f"{where}.models", item.get("models")),
        api_key_env_var=variable,
        api_key=api_key,
        type=kind,
        timeout=_timeout(source, f"{where}.timeout", item.get("timeout")),
        max_retries=_max_retries(source, f"{where}.max_retries", item.get("max_retries")),
        custom_headers=_custom_headers(
            source, f"{where}.custom_headers", item.get("custom_headers")),
    )


def _models(source: str, where: str, value: object) -> tuple[ExternalModel, ...]:
    if not isinstance(value, list) or not value:
        _fail(source, where, "expected a non-empty list of models ({id, type, aliases})")
    models = []
    for number, item in enumerate(value):
        at = f"{where}[{number}]"
        if not isinstance(item, Mapping):
            _fail(source, at, "expected a mapping with at least an 'id'")
        _known_keys(source, at, item, MODEL_KEYS)
        kind = item.get("type")
        aliases = item.get("aliases")
        if aliases is not None and not isinstance(aliases, list):
            _fail(source, f"{at}.aliases", "expected a list of names")
        models.append(ExternalModel(
            id=_string(source, f"{at}.id", item.get("id")),
            type=DEFAULT_MODEL_TYPE if kind is None else _string(source, f"{at}.type", kind),
            aliases=tuple(
                _string(source, f"{at}.aliases[{index}]", alias)
                for index, alias in enumerate(aliases or ())
            ),
        ))
    return tuple(models)


def _timeout(source: str, where: str, value: object) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value <= 0
    ):
        _fail(source, where, f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _max_retries(source: str, where: str, value: object) -> int:
    if value is None:
        return DEFAULT_MAX_RETRIES
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(source, where, f"expected a whole number >= 0, got {value!r}")
    return value


def _custom_headers(source: str, where: str, value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        _fail(source, where, "expected a mapping of header names to values")
    headers: dict[str, tuple[str, str]] = {}
    for name, raw in value.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not FIELD_NAME.match(name):
            _fail(source, at, f"{name!r} is not an HTTP header name")
        lower = name.lower()
        if lower == "authorization":
            _fail(source, at, "the provider's Authorization comes from api_key_env_var")
        if lower in SET_BY_ROUTER:
            _fail(source, at, "the router sets this header itself")
        if lower in headers:
            _fail(source, at, f"given twice (also as {headers[lower][0]!r})")
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            _fail(source, at, f"expected a string value, got {raw!r} (quote it)")
        text = str(raw)
        if any(char in text for char in "\r\n\0"):
            _fail(source, at, "a header value cannot hold a line break or NUL")
        headers[lower] = (name, text)
    return tuple(headers.values())


def _check_unique(source: str, providers: Sequence[ExternalProvider]) -> None:
    """One name, one meaning: provider names, model ids and aliases are all distinct."""
    names: set[str] = set()
    owner: dict[str, str] = {}
    """model id or alias -> the provider it belongs to."""
    for provider in providers:
        if provider.name in names:
            _fail(source, f"{TOP_KEY}.name", f"two providers are named {provider.name!r}")
        names.add(provider.name)
        for model in provider.model_ids:
            if model in owner:
                _fail(source, f"{TOP_KEY}.models",
                      f"model {model!r} is listed by {owner[model]!r} and {provider.name!r}")
            owner[model] = provider.name
    for provider in providers:
        for alias, model in provider.aliases.items():
            if alias in owner:
                _fail(source, f"{TOP_KEY}.models.aliases",
                      f"alias {alias!r} of {model!r} ({provider.name!r}) is already a model "
                      f"or alias of {owner[alias]!r}")
            owner[alias] = provider.name


def external_backends(providers: Iterable[ExternalProvider]) -> list[Backend]:
    """One backend per provider, for the pool's fixed part (no discovery ever finds them)."""
    return [
        Backend(
            url=provider.url,
            models=provider.model_ids,
            id=provider.name,
            kind="external",
            headers=provider.headers(),
            read_timeout=provider.timeout,
            max_retries=provider.max_retries,
        )
        for provider in providers
    ]


def merge_aliases(
    aliases: Mapping[str, str],
    providers: Iterable[ExternalProvider],
    local_models: Collection[str],
) -> dict[str, str]:
    """The pool's aliases: `--static-aliases` and the providers' together.

    A provider's model or alias that is also a local model or a `--static-aliases` alias is
    refused: production-stack sends such a name to the provider, and a pool that quietly
    split it between the provider and the fleet would surprise everyone."""
    merged = dict(aliases)
    for provider in providers:
        for name in [*provider.model_ids, *provider.aliases]:
            if name in local_models:
                raise ConfigError(f"argument {FLAG}: {name!r} of provider {provider.name!r} "
                                  "is also a model of --static-backends")
            if name in aliases:
                raise ConfigError(f"argument {FLAG}: {name!r} of provider {provider.name!r} "
                                  "is also a --static-aliases alias")
        merged.update(provider.aliases)
    return merged


def _known_keys(source: str, where: str, item: Mapping[object, object],
                known: tuple[str, ...]) -> None:
    for key in item:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            _fail(source, path, f"unknown key (known: {', '.join(known)})")


def _string(source: str, where: str, value: object) -> str:
    if value is None:
        _fail(source, where, "required")
    if not isinstance(value, str) or not value.strip():
        _fail(source, where, f"expected a non-empty string, got {value!r}")
    return value


def _fail(source: str, where: str, message: str) -> NoReturn:
    raise ConfigError(f"{source}: {where}: {message}" if where else f"{source}: {message}")
