"""The core leaves the process's JAX configuration alone (checked in a fresh interpreter, since the
test session itself may have changed it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    async_before = jax.config.read("jax_cpu_enable_async_dispatch")
    import surrogate_core as sc
    out = {
        "x64_after_import": bool(jax.config.jax_enable_x64),
        "default_after_import": str(jnp.asarray(1.0).dtype),
        "async_after_import": bool(jax.config.read("jax_cpu_enable_async_dispatch")) == bool(async_before),
    }
    x = np.array([-2.0, -0.7, -1e-300, 0.0, 0.3, 1 / 3, 0.999999999999, 1.5], np.float64)
    g = sc.grad(x, alpha=1.0)
    f = sc.fun(x, alpha=1.0)
    v = sc.vjp(x, np.full_like(x, 1 / 7), alpha=1.0)
    # the NumPy transcription of piecewise_quadratic (braintools): alpha - alpha**2 |x| inside 1/alpha
    ref_g = np.where(np.abs(x) > 1.0, 0.0, 1.0 - np.abs(x))
    out["grad_dtype"] = str(g.dtype)
    out["grad_max_abs_err"] = float(np.max(np.abs(g - ref_g)))
    out["vjp_max_abs_err"] = float(np.max(np.abs(v - ref_g / 7)))
    out["fun_dtype"] = str(f.dtype)
    out["float32_dtype"] = str(sc.grad(x.astype(np.float32)).dtype)
    out["x64_after_calls"] = bool(jax.config.jax_enable_x64)
    out["default_after_calls"] = str(jnp.asarray(1.0).dtype)
    out["user_jit_after_calls"] = str(jax.jit(lambda a: a * 2)(np.ones(3)).dtype)
    sc.configure_for_serving()
    out["async_after_configure"] = bool(jax.config.read("jax_cpu_enable_async_dispatch"))
    out["grad_after_configure_equal"] = bool(np.array_equal(sc.grad(x, alpha=1.0), g))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fresh() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_leaves_x64_and_async_dispatch_alone(fresh):
    assert fresh["x64_after_import"] is False
    assert fresh["default_after_import"] == "float32"
    assert fresh["async_after_import"] is True


def test_float64_computes_exactly_without_global_x64(fresh):
    assert fresh["grad_dtype"] == "float64" and fresh["fun_dtype"] == "float64"
    # 1 - |x| is exact in float64 for these inputs only if the computation really ran in float64
    assert fresh["grad_max_abs_err"] == 0.0
    assert fresh["vjp_max_abs_err"] <= 1e-17
    assert fresh["float32_dtype"] == "float32"


def test_global_default_is_still_float32_after_float64_calls(fresh):
    assert fresh["x64_after_calls"] is False
    assert fresh["default_after_calls"] == "float32"
    assert fresh["user_jit_after_calls"] == "float32"


def test_configure_for_serving_turns_cpu_async_dispatch_off(fresh):
    assert fresh["async_after_configure"] is False
    assert fresh["grad_after_configure_equal"] is True
