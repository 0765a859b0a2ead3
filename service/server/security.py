"""Optional bearer-token authentication.

With ``SURROGATE_API_TOKEN`` (or ``SURROGATE_API_TOKEN_FILE``) set, compute and metadata endpoints
and ``/metrics`` need ``Authorization: Bearer <token>``; tokens are compared in constant time
(``hmac.compare_digest``, every token compared). ``/healthz``, ``/readyz`` and ``/v2/health/*`` stay
open for probes, and so do ``/docs`` and ``/openapi.json`` (the contract is public).
"""

from __future__ import annotations

import hashlib
import hmac

from ..errors import ApiError

__all__ = ["check_token", "token_digests"]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_token(digests: list[bytes], authorization: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <one of the tokens>`` (no-op when auth is off)."""
    if not digests:
        return
    scheme, _, token = (authorization or "").partition(" ")
    given = _digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else b""
    ok = False
    for d in digests:  # no early exit: the time does not depend on which token matched
        ok |= hmac.compare_digest(given, d)
    if not ok:
        raise ApiError(
            401,
            "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
            code="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )


def token_digests(tokens: list[str]) -> list[bytes]:
    return [_digest(t) for t in tokens]
