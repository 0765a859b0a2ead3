"""Helpers shared by the service, client and end-to-end tests."""

from __future__ import annotations

from service.settings import Settings


def make_settings(**kw) -> Settings:
    """Test settings: no warm-up unless asked (tests compile what they use)."""
    kw.setdefault("warmup", False)
    return Settings(**kw)
