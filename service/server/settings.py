"""Configuration: one pydantic-settings class, environment variables prefixed ``SURROGATE_``."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["InvalidSettings", "Settings", "get_settings", "load_settings"]

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class Settings(BaseSettings):
    """Every setting can be given as ``SURROGATE_<NAME>`` (e.g. ``SURROGATE_MAX_ELEMENTS=1000000``)."""

    # hide_input_in_errors: a validation error never echoes what it was given (a token, say)
    model_config = SettingsConfigDict(env_prefix="SURROGATE_", extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Address to bind (`make serve` and `python -m service`).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    grpc_port: int = Field(
        8001, ge=0, le=65535,
        description="TCP port of the Open Inference Protocol over gRPC, on the same host and in the same process "
        "(0: off)."
    )
    root_path: str | None = Field(
        None,
        description="The path prefix a proxy strips before forwarding (e.g. `/api`); named in the contract's `servers`."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the service and the core, in any case (`debug` or `DEBUG`)."
    )
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (each has its own JAX runtime).")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest request body accepted; larger ones get 413 before being read whole."
    )
    max_elements: int = Field(
        1 << 24, ge=1,
        description="Largest total number of elements (after broadcasting) in one request, all jobs together."
    )
    max_rank: int = Field(8, ge=0, le=32, description="Largest rank (number of dimensions) of any array.")
    max_jobs: int = Field(1024, ge=1, description="Largest number of jobs in one list request.")
    min_bucket: int = Field(
        1024, ge=1,
        description="Smallest padded size (a power of two); larger sizes are padded to the next power of two or 1.5 "
        "times one."
    )
    warmup: bool = Field(
        True, description="Compile the default surrogate and dtype at start; /readyz is 503 until done."
    )
    warmup_max_elements: int = Field(
        1 << 17, ge=1, description="Warm-up compiles every bucket up to this many elements."
    )
    graceful_timeout: float = Field(
        20.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before exiting."
    )
    offload_elements: int = Field(
        16384, ge=0,
        description="Batches of at most this many elements compute on the event loop; larger ones in a worker thread "
        "unless measured quicker than offload_seconds.",
    )
    offload_seconds: float = Field(
        0.0003, ge=0,
        description="Batches over offload_elements compute on the event loop when batches of the same op, surrogate "
        "and dtype measured less than this (seconds, per batch) on the device; else in a worker thread. "
        "0: always in a worker thread.",
    )
    max_concurrent: int = Field(
        256, ge=1, description="Compute requests handled at once; past it, 503 with Retry-After at once."
    )
    max_queue: int = Field(
        256, ge=1, description="Requests waiting for the device; past it, 503 with Retry-After at once."
    )
    request_timeout: float = Field(
        30.0, gt=0,
        description="Seconds a compute request may take, body upload included (408 while uploading, else 503); "
        "checked every tenth of it, at most every 50 ms."
    )
    batch_max_delay: float = Field(
        0.0002, ge=0, le=0.1,
        description="Seconds a busy batcher waits to gather concurrent requests into one device call (0 when idle)."
    )
    batch_max_elements: int = Field(
        1 << 20, ge=1,
        description="Largest batch of gathered requests (elements); larger requests are batches of their own."
    )
    api_token: SecretStr | None = Field(
        None, description="If set, compute, metadata and /metrics need `Authorization: Bearer <token>`."
    )
    api_token_file: Path | None = Field(
        None, description="A file of accepted tokens, one per line (blank lines and # comments ignored)."
    )
    opentelemetry: bool = Field(
        False,
        description="Emit OpenTelemetry traces and metrics (FastAPI's native telemetry) when a provider is configured."
    )
    access_log: bool = Field(
        False, description="Log every request (uvicorn's access log); /metrics counts them anyway."
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="Largest request line plus headers (bytes); past it, 431 and the connection is closed.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a connection may take to send a request's line and headers; past it, 408 and close.",
    )
    body_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a request body may go without a byte, and its grace period before "
        "SURROGATE_BODY_MIN_RATE applies; past either, 408 and close.",
    )
    body_min_rate: int = Field(
        1024,
        ge=0,
        description="Bytes per second a request body must average once its first SURROGATE_BODY_TIMEOUT seconds "
        "are over (0: no minimum); under it, 408 and close.",
    )
    memory_budget: int | None = Field(
        None,
        ge=0,
        description="Bytes of request and answer data held at once; unset: the container's memory limit "
        "minus the process's own footprint and a margin.",
    )
    shared_memory: bool = Field(
        False,
        description="Serve Triton's system shared-memory extension (/v2/systemsharedmemory): clients on this host "
        "register POSIX shared-memory regions that /v2 infer requests read inputs from and write outputs into.",
    )
    shared_memory_max_regions: int = Field(
        64, ge=1, description="Shared-memory regions registered at once; past it, registering one more is a 400."
    )
    shutdown_drain: float = Field(
        0.5,
        ge=0,
        le=30,
        description="On SIGTERM, seconds the listener stays open answering 503 (Connection: close) before it closes.",
    )
    send_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds an answer may wait for a client that stops reading; past it the connection is cut.",
    )
    max_variants: int = Field(
        512, ge=1, description="Compiled variants kept at once (least recently used evicted); each holds ~0.3 MB."
    )
    max_cost: float = Field(
        float(1 << 30),
        gt=0,
        description="Largest work per request in element-terms: elements times each surrogate's cost per element "
        "(1, or e.g. n for squarewave_fourier_series).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, v: object) -> object:
        # DEBUG as Python's logging writes it, debug as uvicorn's --log-level does: both (a value that
        # is no level in any case is refused as given)
        return v.lower() if isinstance(v, str) and v.lower() in _LOG_LEVELS else v

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, v: str | None) -> str | None:
        if v is None or not v.strip().rstrip("/"):
            return None
        v = v.strip().rstrip("/")
        if not v.startswith("/"):
            raise ValueError("SURROGATE_ROOT_PATH must start with '/' (e.g. /api)")
        return v

    @field_validator("api_token", "api_token_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        # SURROGATE_API_TOKEN= (empty, as compose writes an unset ${VAR}) means no token
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_token")
    @classmethod
    def _token_is_usable(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < 16:
            raise ValueError("must be at least 16 characters")
        return v

    @field_validator("api_token_file")
    @classmethod
    def _token_file_is_usable(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        if not v.is_file():
            raise ValueError(f"{v} is not a readable file")
        tokens = _read_tokens(v)
        if not tokens:
            raise ValueError(f"{v} holds no token")
        if any(len(t) < 16 for t in tokens):
            raise ValueError(f"every token in {v} must be at least 16 characters")
        return v

    def tokens(self) -> list[str]:
        """Every accepted bearer token (empty: authentication is off)."""
        out = []
        if self.api_token is not None:
            out.append(self.api_token.get_secret_value().strip())
        if self.api_token_file is not None:
            out += _read_tokens(self.api_token_file)
        return out


def _read_tokens(path: Path) -> list[str]:
    """The tokens of a token file: one per line, blank lines and ``#`` comments ignored."""
    out = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():  # a byte-order mark is not a token
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@lru_cache
def get_settings() -> Settings:
    return Settings()


class InvalidSettings(SystemExit):
    """A bad setting: exits with status 2; ``str()`` is one line per problem (no secret in it)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(2)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_settings(flags: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
    """``Settings(**overrides)`` for a program's start: a bad setting is reported on stderr as one
    line per problem, ``surrogate-serve: invalid setting SURROGATE_PORT: ... (got '70000')``, never
    with the value of a secret (a token) and never with a traceback, and the program exits with 2.
    ``flags`` names the command-line option each override came from (``{"port": "--port"}``): a
    problem with it is reported under that name, as the user wrote it."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [_problem(e, flags or {}) for e in exc.errors(include_url=False)]
    err = InvalidSettings(problems)
    print(str(err), file=sys.stderr)
    raise err


#: Fields whose values are never shown.
_SECRET = frozenset({"api_token"})


def _problem(e: Any, flags: Mapping[str, str]) -> str:
    loc = [str(p) for p in e.get("loc", ())]
    name = loc[0] if loc else ""
    where = flags.get(name) or (f"SURROGATE_{name.upper()}" if name else "settings")
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    line = f"surrogate-serve: invalid setting {where}: {msg}"
    # the value is shown, except for secrets and where the message says it already (our own checks)
    if name and name not in _SECRET and "input" in e and e.get("type") not in ("missing", "value_error"):
        shown = repr(e["input"])
        line += f" (got {shown if len(shown) <= 80 else shown[:80] + '...'})"
    return line
