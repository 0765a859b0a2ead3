"""The benchmark's KServe peer: the piecewise-quadratic surrogate gradient as a `kserve.Model`.

Runs in its own virtual environment (``bench/.venvs/kserve``, pins in ``kserve-requirements.txt``)
and answers the Open Inference Protocol (v2) on ``POST /v2/models/piecewise_quadratic/infer``:
input ``x`` (FP32), output ``grad``, the scalar ``alpha`` in the request's ``parameters``. JSON
tensors and the binary tensor extension are both KServe's own code paths.

    python bench/peers/kserve_model.py --http_port 8080 --enable_grpc false

With ``--enable_grpc true --grpc_port G`` it answers the same over gRPC (``make bench``'s gRPC section).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

NAME = "piecewise_quadratic"


@jax.jit
def grad(x, alpha):
    """g'(x) = alpha - alpha^2 |x| where |x| <= 1/alpha, else 0 (float32 in, float32 out)."""
    ax = jnp.abs(x)
    return jnp.where(ax <= 1 / alpha, alpha - alpha * alpha * ax, jnp.zeros((), x.dtype))


def _param(parameters, key: str, default: float) -> float:
    if parameters is None:
        return default
    if isinstance(parameters, dict):
        value = parameters.get(key, default)
    elif hasattr(parameters, "get"):  # over gRPC: a map of InferParameter messages
        value = parameters.get(key, default)
        if hasattr(value, "WhichOneof"):  # (KServe's InferParameter has no double field: alpha=1 comes as int64)
            kind = value.WhichOneof("parameter_choice")
            value = default if kind is None else getattr(value, kind)
    else:  # a pydantic Parameters model (extra fields allowed)
        value = getattr(parameters, key, default)
    return float(value)


class PiecewiseQuadratic(Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load()

    def load(self) -> bool:
        grad(np.zeros(16, np.float32), np.float32(1.0)).block_until_ready()  # compile once before "ready"
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        tensor = payload.get_input_by_name("x") or payload.inputs[0]
        x = np.asarray(tensor.as_numpy(), np.float32)
        alpha = np.float32(_param(payload.parameters, "alpha", 1.0))
        g = np.asarray(grad(x, alpha))
        if payload.from_grpc:  # raw_output_contents (KServe's own gRPC encoder takes no array as data)
            out = InferOutput(name="grad", shape=list(g.shape), datatype="FP32")
            out.set_data_from_numpy(g, binary_data=True)
        else:
            out = InferOutput(name="grad", shape=list(g.shape), datatype="FP32", data=g)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=[out],
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


if __name__ == "__main__":
    server = ModelServer()  # reads --http_port, --enable_grpc, ... from the command line
    for logger in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    server.start([PiecewiseQuadratic(NAME)])
