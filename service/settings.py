"""Configuration: one pydantic-settings class, environment variables prefixed ``SURROGATE_``."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Every setting can be given as ``SURROGATE_<NAME>`` (e.g. ``SURROGATE_MAX_ELEMENTS=1000000``)."""

    model_config = SettingsConfigDict(env_prefix="SURROGATE_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind (`make serve` and `python -m service`).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the service and the core."
    )
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (each has its own JAX runtime).")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413 before being read whole."
    )
    max_elements: int = Field(
        1 << 24, ge=1, description="Largest total number of elements (after broadcasting) in one request, all jobs together."
    )
    max_rank: int = Field(8, ge=0, le=32, description="Largest rank (number of dimensions) of any array.")
    max_jobs: int = Field(1024, ge=1, description="Largest number of jobs in one list request.")
    min_bucket: int = Field(
        1024, ge=1, description="Smallest padded size (a power of two); sizes are padded to powers of two above it."
    )
    warmup: bool = Field(True, description="Compile the default surrogate and dtype at start; /readyz is 503 until done.")
    warmup_max_elements: int = Field(
        1 << 17, ge=1, description="Warm-up compiles every bucket up to this many elements."
    )
    graceful_timeout: float = Field(
        20.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before exiting."
    )
    offload_elements: int = Field(
        16384, ge=0, description="Requests with more elements than this compute in a worker thread, off the event loop."
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
