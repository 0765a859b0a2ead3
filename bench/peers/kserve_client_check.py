"""Whether KServe's own v2 REST client (`kserve.InferenceRESTClient`) can talk to a v2 server.

Runs in the KServe peer's virtual environment (``bench/.venvs/kserve``, created by ``make bench``):

    bench/.venvs/kserve/bin/python bench/peers/kserve_client_check.py http://127.0.0.1:8000 [--model NAME]

Calls server_live, server_ready, model_ready, then infer with ``x`` and ``alpha`` as JSON tensors
and with the binary tensor extension, checks each answer against a NumPy transcription of the
piecewise-quadratic gradient and prints one line per call. Exits 0 when every call worked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


def reference(x: np.ndarray, alpha: float) -> np.ndarray:
    a = np.float32(alpha)
    ax = np.abs(x)
    return np.where(ax <= 1 / a, a - a * a * ax, 0).astype(np.float32)


def request(model: str, x: np.ndarray, alpha: float, binary: bool) -> InferRequest:
    tensor = InferInput(name="x", shape=list(x.shape), datatype="FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [RequestedOutput(name="grad", parameters={"binary_data": binary})]
    return InferRequest(model_name=model, infer_inputs=[tensor], parameters={"alpha": alpha}, request_outputs=outputs)


async def health(calls: list) -> bool:
    """Each ``(label, call)``: awaited, its answer printed; whether every one answered ``True``."""
    ok = True
    for label, call in calls:
        try:
            value = await call()
            print(f"{label}: {value}")
            ok &= value is True
        except Exception as e:  # report every failure, go on with the next call
            print(f"{label}: FAILED {type(e).__name__}: {e}")
            ok = False
    return ok


async def checked(label: str, call, x: np.ndarray, alpha: float, *, pick=lambda res: res.outputs[0],
                  name: str | None = None) -> bool:
    """Await ``call()`` (an infer), check the output ``pick`` finds (named ``name``, if given) against
    the NumPy reference, print one line; whether it was right."""
    try:
        res = await call()
        out = pick(res)
        got = np.asarray(out.as_numpy(), np.float32)
        right = (name is None or out.name == name) and got.shape == x.shape and np.allclose(
            got, reference(x, alpha), rtol=1e-6, atol=1e-6)
        print(f"{label}: {'equal to the NumPy reference' if right else 'WRONG ANSWER'} "
              f"(output {out.name!r}, {out.datatype}, shape {list(got.shape)})")
        return bool(right)
    except Exception as e:  # report every failure, go on with the next call
        print(f"{label}: FAILED {type(e).__name__}: {e}")
        return False


async def check(url: str, model: str) -> bool:
    ok = True
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    try:
        ok &= await health([
            ("server_live", lambda: client.is_server_live(url)),
            ("server_ready", lambda: client.is_server_ready(url)),
            ("model_ready", lambda: client.is_model_ready(url, model)),
        ])
        x = np.linspace(-2, 2, 1001, dtype=np.float32)
        for alpha in (1.0, 2.0):
            for binary in (False, True):
                label = f"infer alpha={alpha} {'binary' if binary else 'JSON'}"
                ok &= await checked(label, lambda b=binary, a=alpha: client.infer(
                    url, request(model, x, a, b), model_name=model), x, alpha,
                    pick=lambda res: res.get_output_by_name("grad") or res.outputs[0])
    finally:
        await client.close()
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="base URL of the v2 server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default="piecewise_quadratic")
    args = ap.parse_args(argv)
    ok = asyncio.run(check(args.url, args.model))
    print("all calls worked" if ok else "some calls FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
