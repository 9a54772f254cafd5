"""Static discovery: the backends given by `--static-backends` / `--static-models`."""

from __future__ import annotations

from router.backends.pool import Backend
from router.config.settings import Config

__all__ = ["static_backends"]


def static_backends(config: Config) -> list[Backend]:
    return [
        Backend(url=item.url, models=item.models, labels=item.labels,
                model_type=item.model_type if config.static_backend_health_checks else None)
        for item in config.static_backends
    ]
