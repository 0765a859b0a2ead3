"""openapi.yaml is the contract: it must equal what the app serves, and be a valid OpenAPI document."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from openapi_spec_validator import validate

from service.app import create_app
from service.contract import dump

from helpers import make_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_checked_in_contract_equals_the_served_schema():
    app = create_app(make_settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        served = (await c.get("/openapi.json")).json()
    checked_in = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert checked_in == served, "openapi.yaml is stale: run `make openapi` and review the diff"
    # and the file is exactly what `make openapi` writes
    assert (ROOT / "openapi.yaml").read_text() == dump(served)


def test_contract_is_valid_openapi():
    validate(yaml.safe_load((ROOT / "openapi.yaml").read_text()))


def test_contract_documents_bodies_errors_and_the_seed_example():
    doc = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    for ep in ("spike", "grad", "fun"):
        op = doc["paths"][f"/v1/{ep}"]["post"]
        content = op["requestBody"]["content"]
        assert next(iter(content)) == "application/json"  # Swagger UI's "Try it out" opens on a JSON body
        examples = content["application/json"]["examples"]
        assert examples["one_job"]["value"]["x"] == [-2.0, -0.5, 0.0, 0.5, 2.0]
        assert set(content) == {"application/json", "application/x-npy", "application/x-npz"}
        for status in ("400", "413", "415", "422"):
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    spike_example = doc["paths"]["/v1/spike"]["post"]["responses"]["200"]["content"]["application/json"]["example"]
    assert spike_example["spike"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    job = doc["components"]["schemas"]["GradJob"]
    assert job["additionalProperties"] is False and job["required"] == ["x"]
    assert job["properties"]["surrogate"]["default"] == "piecewise_quadratic"
    assert "piecewise_quadratic" in doc["components"]["schemas"]["SurrogateName"]["enum"]
    assert "cotangent" in job["properties"] and "alpha" in job["properties"]
