"""The benchmark's MLServer peer: the piecewise-quadratic surrogate gradient as an `MLModel`.

Runs in its own virtual environment (``bench/.venvs/mlserver``, pins in
``../mlserver-requirements.txt``) and answers the Open Inference Protocol (v2) on
``POST /v2/models/piecewise_quadratic/infer``: input ``x`` (FP32), output ``grad``, the scalar
``alpha`` in the request's ``parameters``. Started as ``mlserver start bench/peers/mlserver`` with
the ports in ``MLSERVER_HTTP_PORT`` and ``MLSERVER_GRPC_PORT`` (``settings.json`` holds the rest:
in-process inference with ``parallel_workers`` 0, no metrics server, no gzip, no debug logging).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


@jax.jit
def grad(x, alpha):
    """g'(x) = alpha - alpha^2 |x| where |x| <= 1/alpha, else 0 (float32 in, float32 out)."""
    ax = jnp.abs(x)
    return jnp.where(ax <= 1 / alpha, alpha - alpha * alpha * ax, jnp.zeros((), x.dtype))


class PiecewiseQuadratic(MLModel):
    async def load(self) -> bool:
        grad(np.zeros(16, np.float32), np.float32(1.0)).block_until_ready()  # compile once before "ready"
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = next((t for t in payload.inputs if t.name == "x"), payload.inputs[0])
        x = np.asarray(NumpyCodec.decode_input(tensor), np.float32)
        alpha = np.float32(getattr(payload.parameters, "alpha", None) or 1.0)
        g = np.asarray(grad(x, alpha))
        out = NumpyCodec.encode_output("grad", g)
        out.shape = list(g.shape)  # the codec adds a batch dimension to 1-D outputs
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[out])
