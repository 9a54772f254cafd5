"""production-stack's dynamic config file (`--dynamic-config-yaml`, `--dynamic-config-json`)
as settings for the flag parser.

Its keys are production-stack's flag names with underscores (`service_discovery`,
`routing_logic`, `static_backends`, `static_models`, `static_aliases`, `session_key`,
`callbacks`, `k8s_namespace`...); values are what the flags take, comma-separated strings
included. Its YAML form may also group backends by model:

```yaml
service_discovery: static
routing_logic: roundrobin
static_models:
  llama-3-8b: {static_backends: [http://10.0.0.7:8000, http://10.0.0.8:8000],
               static_model_type: chat}
static_aliases: {gpt-4o: llama-3-8b}
```

which becomes one backend per URL, each with the models listing it (production-stack lists
a URL serving two models twice; here it is one backend serving both).
"""

from __future__ import annotations

from collections.abc import Mapping

from router.config.file import read_config_file
from router.config.settings import ConfigError

__all__ = ["read_dynamic_config"]


def read_dynamic_config(path: str) -> dict[str, object]:
    """The file's settings, keyed like the flags; blocking (call at start or in a thread)."""
    data = dict(read_config_file(path))
    models = data.get("static_models")
    if isinstance(models, Mapping):
        data.update(backends_by_model(models, path))
    return data


def backends_by_model(models: Mapping[object, object], path: str) -> dict[str, object]:
    """`static_models` as a mapping of model -> {static_backends, static_model_type} turned
    into the per-backend lists of `--static-backends`, `--static-models` and
    `--static-model-types`."""
    served: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for model, details in models.items():
        urls = details.get("static_backends") if isinstance(details, Mapping) else None
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise ConfigError(f"config file {path}: static_models: {model!r} needs "
                              "static_backends, a list of URLs")
        assert isinstance(details, Mapping)
        model_type = details.get("static_model_type")
        for url in urls:
            served.setdefault(url, []).append(str(model))
            if isinstance(model_type, str):
                types.setdefault(url, model_type)
    settings: dict[str, object] = {
        "static_backends": list(served),
        "static_models": [list(names) for names in served.values()],
    }
    if types:
        if len(types) != len(served):
            raise ConfigError(f"config file {path}: static_models: give static_model_type "
                              "to every model or to none")
        settings["static_model_types"] = [types[url] for url in served]
    return settings
