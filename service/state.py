"""The per-app runtime state shared by the routes (one instance in ``app.state.runtime``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import surrogate_core as core

from .batching import Batcher
from .metrics import Metrics
from .settings import Settings

__all__ = ["Runtime"]


@dataclass
class Runtime:
    settings: Settings
    engine: core.Engine
    batcher: Batcher
    metrics: Metrics
    token_digests: list[bytes] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    warmup_error: str | None = None
