"""Fuzzing from the contract: schemathesis generates requests from openapi.yaml and sends them to
the live app in-process; no response may be a 5xx, and every response must conform to the schema.

``SURROGATE_FUZZ_EXAMPLES`` sets the examples per operation (40 by default; a deeper run: 500)."""

from __future__ import annotations

import os
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from service.app import create_app

from helpers import make_settings

ROOT = Path(__file__).resolve().parents[2]

# .npy / .npz bodies are bytes on the wire: send what schemathesis generates as they are
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")
schemathesis.serializer.alias("application/x-npz", "application/octet-stream")

app = create_app(make_settings(max_elements=50_000, max_body_bytes=1_000_000))
app.state.runtime.ready.set()
schema = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))
schema.config.update(base_url="http://testserver")
schema.app = app


@schema.parametrize()
@settings(max_examples=int(os.environ.get("SURROGATE_FUZZ_EXAMPLES", "40")), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_contract_fuzz(case):
    case.call_and_validate(
        checks=[
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.status_code_conformance,
            schemathesis.checks.content_type_conformance,
            schemathesis.checks.response_schema_conformance,
            schemathesis.checks.response_headers_conformance,
        ]
    )
