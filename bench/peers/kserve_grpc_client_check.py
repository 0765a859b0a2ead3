"""Whether KServe's own v2 gRPC client (`kserve.InferenceGRPCClient`) can talk to a v2 gRPC server.

Runs in the KServe peer's virtual environment (``bench/.venvs/kserve``, created by ``make bench``):

    bench/.venvs/kserve/bin/python bench/peers/kserve_grpc_client_check.py 127.0.0.1:8001 [--model NAME]
        [--token TOKEN]

Calls is_server_live, is_server_ready, is_model_ready, then infer with ``x`` as typed contents and
as raw contents, ``alpha`` in the request's parameters as KServe sends it (an integer as
``int64_param``; KServe's parameters have no double field, so 2.5 goes as the string ``"2.5"``), the
output ``grad`` asked raw or typed, and one infer with an unknown model, which must fail with
NOT_FOUND. Each answer is checked against a NumPy transcription of the piecewise-quadratic gradient,
one line per call. Exits 0 when every call worked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput
from kserve_client_check import checked, health  # (this script's folder: bench/peers)


def request(model: str, x: np.ndarray, alpha: int | str, raw_in: bool, raw_out: bool) -> InferRequest:
    tensor = InferInput(name="x", shape=list(x.shape), datatype="FP32")
    tensor.set_data_from_numpy(x, binary_data=raw_in)  # binary: raw_input_contents; else typed fp32_contents
    outputs = [RequestedOutput(name="grad", parameters={"binary_data": raw_out})]
    return InferRequest(model_name=model, infer_inputs=[tensor], parameters={"alpha": alpha}, request_outputs=outputs)


async def check(url: str, model: str, token: str | None) -> bool:
    ok = True
    headers = [("authorization", f"Bearer {token}")] if token else None
    async with InferenceGRPCClient(url, timeout=30, retries=0) as client:
        ok &= await health([
            ("server_live", lambda: client.is_server_live(headers=headers)),
            ("server_ready", lambda: client.is_server_ready(headers=headers)),
            ("model_ready", lambda: client.is_model_ready(model, headers=headers)),
        ])
        x = np.linspace(-2, 2, 1001, dtype=np.float32)
        for alpha in (1, 2, "2.5"):
            for raw_in, raw_out in ((False, False), (True, True), (True, False), (False, True)):
                label = (f"infer alpha={alpha!r} x {'raw' if raw_in else 'typed'}, "
                         f"grad {'raw' if raw_out else 'typed'}")
                ok &= await checked(label, lambda a=alpha, i=raw_in, o=raw_out: client.infer(
                    request(model, x, a, i, o), headers=headers), x, float(alpha), name="grad")
        try:
            await client.infer(request("no_such_model", x, 1, True, True), headers=headers)
            print("infer of an unknown model: WRONG: it worked")
            ok = False
        except grpc.aio.AioRpcError as e:
            right = e.code() == grpc.StatusCode.NOT_FOUND
            print(f"infer of an unknown model: {e.code().name} {e.details()}")
            ok &= right
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="host:port of the v2 gRPC server, e.g. 127.0.0.1:8001")
    ap.add_argument("--model", default="piecewise_quadratic")
    ap.add_argument("--token", help="a bearer token, sent as 'authorization: Bearer <token>' metadata")
    args = ap.parse_args(argv)
    ok = asyncio.run(check(args.url, args.model, args.token))
    print("all calls worked" if ok else "some calls FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
