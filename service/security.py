"""Optional bearer-token authentication.

With ``SURROGATE_API_TOKEN`` (or ``SURROGATE_API_TOKEN_FILE``) set, compute and metadata endpoints
and ``/metrics`` need ``Authorization: Bearer <token>``; tokens are compared in constant time
(``hmac.compare_digest``, every token compared). ``/healthz`` and ``/readyz`` stay open for probes,
and so do ``/docs`` and ``/openapi.json`` (the contract is public).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

__all__ = ["require_token", "bearer_scheme"]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="Needed only when the server is configured with SURROGATE_API_TOKEN or SURROGATE_API_TOKEN_FILE.",
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> None:
    digests: list[bytes] = request.app.state.runtime.token_digests
    if not digests:
        return
    given = _digest(credentials.credentials) if credentials is not None and credentials.scheme.lower() == "bearer" else b""
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
