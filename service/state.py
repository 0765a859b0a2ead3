"""The per-app runtime shared by the endpoint handlers (``app.state.runtime``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import surrogate_core as core

from .dataplane import DataPlane
from .dataplane.batching import Batcher
from .dataplane.metrics import Metrics
from .protocols.shm import Regions
from .server.settings import Settings

__all__ = ["Runtime"]


@dataclass
class Runtime:
    settings: Settings
    engine: core.Engine
    dataplane: DataPlane
    token_digests: list[bytes] = field(default_factory=list)
    #: the system shared-memory regions (None: SURROGATE_SHARED_MEMORY is off)
    shm: Regions | None = None

    @property
    def batcher(self) -> Batcher:
        return self.dataplane.batcher

    @property
    def metrics(self) -> Metrics:
        return self.dataplane.metrics

    @property
    def ready(self) -> threading.Event:
        return self.dataplane.ready
