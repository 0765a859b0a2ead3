"""The client package on its own: its public names, its exception tree, and its light imports."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import surrogate_client
from surrogate_client import (
    ApiError,
    AuthenticationError,
    BadRequest,
    ClientError,
    DecodingError,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    SurrogateError,
    Timeout,
    TransportError,
    UnsupportedMediaType,
    ValidationError,
)

PKG = Path(__file__).resolve().parents[2] / "surrogate_client"

PUBLIC = [
    "ApiError",
    "AsyncSurrogateClient",
    "AuthenticationError",
    "BadRequest",
    "ClientError",
    "DecodingError",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "ServiceUnavailable",
    "SurrogateClient",
    "SurrogateError",
    "Timeout",
    "TransportError",
    "UnsupportedMediaType",
    "ValidationError",
    "__version__",
]


def test_all_is_exactly_the_public_api_and_sorted():
    assert surrogate_client.__all__ == PUBLIC
    assert sorted(surrogate_client.__all__) == surrogate_client.__all__
    for name in PUBLIC:
        assert getattr(surrogate_client, name) is not None
    public_attrs = {n for n in vars(surrogate_client) if not n.startswith("_")}
    # nothing else public but the private modules' names, which Python binds on import, and the
    # framework adapters (surrogate_client.torch, surrogate_client.jax) once something imported them
    assert public_attrs - set(PUBLIC) <= {"torch", "jax"}


def test_installed_from_its_own_distribution():
    assert Path(surrogate_client.__file__).resolve().is_relative_to(PKG / "src" / "surrogate_client")
    assert (PKG / "src" / "surrogate_client" / "py.typed").is_file()
    meta = tomllib.loads((PKG / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "surrogate-client"
    assert sorted(d.split(">")[0].split("=")[0] for d in meta["project"]["dependencies"]) == ["httpx", "numpy"]
    from importlib.metadata import version

    assert version("surrogate-client") == surrogate_client.__version__


def test_exception_tree():
    tree = {
        ApiError: SurrogateError,
        ClientError: ApiError,
        BadRequest: ClientError,
        AuthenticationError: ClientError,
        NotFound: ClientError,
        PayloadTooLarge: ClientError,
        UnsupportedMediaType: ClientError,
        ValidationError: ClientError,
        ServerError: ApiError,
        ServiceUnavailable: ServerError,
        TransportError: SurrogateError,
        Timeout: TransportError,
        DecodingError: SurrogateError,
    }
    for cls, parent in tree.items():
        assert cls.__bases__ == (parent,), cls
    assert SurrogateError.__bases__ == (Exception,)
    # the tree is drawn in the exceptions module's docstring
    doc = sys.modules["surrogate_client._exceptions"].__doc__
    for cls in tree:
        assert cls.__name__ in doc


def test_api_error_carries_the_body_and_pickles():
    err = ValidationError(422, "invalid_value", "job 0, field 'alpha': bad", job=0, field="alpha")
    assert str(err) == "422 invalid_value: job 0, field 'alpha': bad"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ValidationError
    assert (back.status, back.code, back.message, back.job, back.field) == (422, "invalid_value", err.message, 0, "alpha")


BLOCKER = """
import sys

class Block:
    BLOCKED = {"jax", "jaxlib", "fastapi", "starlette", "uvicorn", "pydantic", "service", "surrogate_core", "ml_dtypes"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
import surrogate_client as sc
from surrogate_client import _wire
loaded = sorted(m for m in sys.modules if m.split(".")[0] in Block.BLOCKED)
assert not loaded, loaded
assert _wire.BFLOAT16 is None  # without ml_dtypes bfloat16 results are float32

import httpx
def handler(request):
    return httpx.Response(200, json={"surrogate": "piecewise_quadratic", "dtype": "bfloat16", "shape": [2],
                                     "grad": [0.5, 1.0]})
with sc.SurrogateClient("http://t", http_transport=httpx.MockTransport(handler)) as c:
    g = c.grad([0.5, 0.0], dtype="bfloat16")
assert g.dtype == np.float32 and g.tolist() == [0.5, 1.0], g
print("ok", sc.__version__)
"""


def test_imports_without_jax_fastapi_or_the_service(tmp_path):
    # run from an empty folder so that only the installed package can be found
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BLOCKER)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


@pytest.mark.parametrize("module", ["_client", "_exceptions", "_wire"])
def test_modules_import_only_stdlib_httpx_numpy_anyio(module):
    import ast

    src = (PKG / "src" / "surrogate_client" / f"{module}.py").read_text()
    roots = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names)
    # ml_dtypes and brotli are optional: used when importable (brotli to read brotli answers, as httpx does)
    assert third_party <= {"httpx", "numpy", "anyio", "ml_dtypes", "brotli"}, third_party
