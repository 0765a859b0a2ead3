"""The per-app runtime shared by the endpoint handlers (``app.state.runtime``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import surrogate_core as core

from .batching import Batcher
from .dataplane import DataPlane
from .metrics import Metrics
from .settings import Settings

__all__ = ["Runtime"]


@dataclass
class Runtime:
    settings: Settings
    engine: core.Engine
    dataplane: DataPlane
    token_digests: list[bytes] = field(default_factory=list)
    #: the OpenAPI document (built once, on first use)
    contract: Callable[[], dict[str, Any]] = field(default=dict)

    @property
    def batcher(self) -> Batcher:
        return self.dataplane.batcher

    @property
    def metrics(self) -> Metrics:
        return self.dataplane.metrics

    @property
    def ready(self) -> threading.Event:
        return self.dataplane.ready
