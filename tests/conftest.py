"""Shared test set-up: strict JAX, an app and clients over httpx's ASGI transport."""

from __future__ import annotations

import jax

import surrogate_core  # noqa: F401  (enables x64 before any test builds arrays)

jax.config.update("jax_numpy_rank_promotion", "raise")
