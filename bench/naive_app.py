"""The baseline to beat: the same endpoint as a user would write it in an afternoon with FastAPI,
Pydantic ``list[float]`` bodies and a jitted JAX formula, responses through FastAPI's encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


@jax.jit
def _grad(x, alpha):
    return jnp.where(jnp.abs(x) > 1 / alpha, 0.0, alpha - alpha**2 * jnp.abs(x))


class GradRequest(BaseModel):
    x: list[float]
    alpha: float = 1.0


class GradResponse(BaseModel):
    grad: list[float]


@app.post("/v1/grad")
def grad(req: GradRequest) -> GradResponse:
    x = np.asarray(req.x, dtype=np.float32)
    return GradResponse(grad=np.asarray(_grad(x, np.float32(req.alpha))).tolist())
