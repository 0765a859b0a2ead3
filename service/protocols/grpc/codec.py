"""``ModelInfer`` over gRPC: a ``ModelInferRequest`` (its serialized bytes, as the server receives
them) into the ``/v2`` decoding, and the results into a serialized ``ModelInferResponse``.

The request becomes the request object ``/v2`` reads (``inputs`` with their ``parameters``,
``outputs``, ``parameters``, ``id``), each input's ``raw_input_contents`` entry handed over as its
binary data without a copy, so every check and message of ``/v2`` (and whatever its decoding reads
from a tensor's ``parameters``, such as shared-memory regions) applies unchanged:

- **inputs**: ``raw_input_contents`` belong, in order, to the inputs that take raw contents, every
  input except those in shared memory (``shared_memory_region`` in its parameters), which have no
  raw entry. Without raw contents, inputs carry typed ``contents`` (``fp32_contents`` for FP32,
  ``fp64_contents`` for FP64; FP16 and BF16 have no typed contents in the protocol). A request
  mixes neither.
- **parameters** (``InferParameter``): the value of whichever field is set. A request parameter that
  is a string holding a number counts as that number (KServe's client sends ``alpha=1`` as
  ``int64_param``, and other clients send numbers as strings).
- **outputs**: as raw contents (``raw_output_contents``, one entry per output, in the order of
  ``outputs``: an output that carries no raw data, typed or written to shared memory, has an empty
  entry, so that positions stay aligned), or as typed contents for an output requested with
  ``binary_data: false`` (FP32 and FP64).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

import surrogate_core as core

from ...dataplane.limits import Limits
from ...errors import ApiError, shown, shown_field
from ..tensors.arrays import check_finite
from ..tensors.npy import jobs_answer_bytes
from ..v2.codec import _NAMES, _WIRE, DATATYPES, VERSION, decode_request, model

__all__ = ["GrpcCodec", "GrpcDecoded", "message_value", "parameters", "set_parameter"]

#: ``InferTensorContents`` field numbers (all repeated scalars, packed on the wire)
_CONTENTS = {f.number: f.name for f in pb.InferTensorContents.DESCRIPTOR.fields}
_TYPED: dict[str, tuple[str, np.dtype[Any]]] = {"FP32": ("fp32_contents", np.dtype("<f4")),
                                               "FP64": ("fp64_contents", np.dtype("<f8"))}
_RAW_TAG = bytes([pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number << 3 | 2])
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
#: parameters of a tensor that name a shared-memory region (such an input has no raw entry)
_SHM_REGION = "shared_memory_region"


def _bad(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, message, field=shown_field(field) if field else field, code="invalid_value")


def message_value(p: pb.InferParameter) -> Any:
    """An ``InferParameter``'s value: whichever of its fields is set (None when none is)."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def parameters(params: Any, numbers: bool = False) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as a dict; with ``numbers``, strings that hold a number
    become that number."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        v = message_value(p)
        if numbers and isinstance(v, str) and len(v) <= 64 and _NUMBER.fullmatch(v):
            v = float(v)
        out[key] = v
    return out


def set_parameter(p: pb.InferParameter, value: Any) -> None:
    """Set the ``InferParameter`` field that holds ``value``."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = b[i]
        n |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return n, i
        shift += 7


def _typed(t: pb.ModelInferRequest.InferInputTensor, name: str) -> memoryview | None:
    """An input's typed contents as little-endian bytes of its datatype (None when it has none, or
    when its datatype is not one ``/v2`` takes: ``/v2`` then says so)."""
    blob = t.contents.SerializeToString()  # one packed field: tag, length, the values' bytes
    if not blob:
        return None
    tag, i = _read_varint(blob, 0)
    size, i = _read_varint(blob, i)
    field = _CONTENTS.get(tag >> 3, "contents")
    if i + size != len(blob):
        raise _bad(f"input {shown(name)}: typed contents in more than one field ({field} and others); send one", name)
    datatype = t.datatype
    if datatype not in DATATYPES:
        return None
    if datatype not in _TYPED:
        raise _bad(f"input {shown(name)}: {datatype} tensors travel only as raw_input_contents (the protocol has "
                   "no typed contents for them)", name)
    want, wire = _TYPED[datatype]
    if field != want:
        raise _bad(f"input {shown(name)}: {datatype} typed contents go in {want}, got {field}", name)
    data = memoryview(blob)[i:]
    shape = list(t.shape)
    n = len(data) // wire.itemsize
    if all(d >= 0 for d in shape) and n != math.prod(shape):
        raise _bad(f"input {shown(name)}: contents hold {n} values, shape {shape} needs {math.prod(shape)}", name)
    return data


class GrpcRequest:
    """A ``ModelInfer`` call: its model once its message is read (the statistics count a failure under it)."""

    __slots__ = ("model",)

    def __init__(self) -> None:
        self.model: core.Surrogate | None = None


class GrpcDecoded:
    __slots__ = ("model", "req", "outputs", "jobs")

    def __init__(self, sur: core.Surrogate, req: dict[str, Any], outputs: list[Any], jobs: list[core.Job]) -> None:
        self.model = sur
        self.req = req
        self.outputs = outputs
        self.jobs = jobs


class GrpcCodec:
    """``ModelInfer``: serialized ``ModelInferRequest`` in, serialized ``ModelInferResponse`` out,
    for ``DataPlane.serve`` (admission, limits, batching and metrics are the data plane's)."""

    protocol = "grpc"
    endpoint = "infer"
    job_index = False

    def __init__(self, limits: Limits, regions: Any = None) -> None:
        self.limits = limits
        self.regions = regions  # the shared-memory regions (``service.protocols.shm.Regions``; None: off)

    def parse_bytes(self, request: GrpcRequest, body: bytes) -> int:
        """The parsed message holds the raw contents once more, and each entry read out once more."""
        return 2 * len(body) + 4096

    def decode(self, request: GrpcRequest, body: bytes) -> GrpcDecoded:
        try:
            msg = pb.ModelInferRequest.FromString(body)
        except DecodeError:
            raise _bad("the request is not a valid ModelInferRequest message") from None
        sur = request.model = model(msg.model_name, msg.model_version or None)
        req, raws = self.request(msg)
        req, outputs, jobs = decode_request(sur, req, memoryview(b""), False, self.limits, raws, regions=self.regions)
        return GrpcDecoded(sur, req, outputs, jobs)

    @staticmethod
    def request(msg: pb.ModelInferRequest) -> tuple[dict[str, Any], list[memoryview]]:
        """The request object ``/v2`` decodes, and each input's binary data (empty for an input in
        shared memory, or one ``/v2`` refuses)."""
        raw = msg.raw_input_contents
        inputs: list[dict[str, Any]] = []
        raws: list[memoryview] = []
        used = 0
        empty = memoryview(b"")
        for t in msg.inputs:
            params = parameters(t.parameters)
            tensor: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                                      "parameters": params}
            inputs.append(tensor)
            data: memoryview = empty
            if _SHM_REGION not in params:
                typed = _typed(t, t.name)
                if raw:
                    if typed is not None:
                        raise _bad(f"input {shown(t.name)}: has typed contents while the request has "
                                   "raw_input_contents; send one or the other", t.name)
                    if used < len(raw):
                        data = memoryview(raw[used])
                    used += 1
                    params["binary_data_size"] = len(data)
                elif typed is not None:
                    data = typed
                    params["binary_data_size"] = len(data)
                elif t.datatype in DATATYPES:
                    shape = list(t.shape)
                    if all(d >= 0 for d in shape) and math.prod(shape) > 0:
                        raise _bad(f"input {shown(t.name)}: has neither contents nor raw_input_contents", t.name)
                    params["binary_data_size"] = 0  # no values: an empty tensor (or a shape /v2 refuses)
            raws.append(data)
        if raw and used != len(raw):
            raise _bad(f"the request has {len(raw)} raw_input_contents for {used} inputs that take raw contents "
                       "(inputs in shared memory take none)")
        req: dict[str, Any] = {"inputs": inputs}
        if msg.id:
            req["id"] = msg.id
        params = parameters(msg.parameters, numbers=True)
        params.setdefault("binary_data_output", True)  # raw contents unless an output asks otherwise
        req["parameters"] = params
        if msg.outputs:
            req["outputs"] = [{"name": o.name, "parameters": parameters(o.parameters)} for o in msg.outputs]
        return req, raws

    @staticmethod
    def where(decoded: GrpcDecoded, i: int) -> str:
        return f"output {decoded.outputs[i][0]!r}"

    @staticmethod
    def answer_bytes(decoded: GrpcDecoded) -> int:
        """The results in their wire dtype, the message made of them and (typed contents) its parsed
        copy: at most four times the data."""
        return 4 * jobs_answer_bytes(decoded.jobs, json=False) + 4096

    @staticmethod
    def extra_bytes(decoded: GrpcDecoded) -> int:
        return 0

    @staticmethod
    def binary_answer(decoded: GrpcDecoded) -> bool:
        return True  # raw or typed contents, or a region: copies of the results at most, never text

    def encode(self, decoded: GrpcDecoded, results: list[np.ndarray]) -> bytes:
        """The serialized ``ModelInferResponse``: the message without raw contents, then each
        output's raw entry appended as the field it is on the wire (no copy into a message first)."""
        sur, req = decoded.model, decoded.req
        answer = pb.ModelInferResponse(model_name=sur.name, model_version=VERSION, id=req.get("id", ""))
        raws: list[bytes | memoryview] = []
        writes: list[tuple[Any, np.ndarray, np.dtype[Any], str]] = []  # made once every output is checked
        any_raw = False
        for entry, job, res in zip(decoded.outputs, decoded.jobs, results, strict=True):
            name, binary = entry[0], entry[1]
            if job.op != "spike":  # spikes are 0 or 1, always finite
                check_finite(job, res, text=False, where=f"output {shown(name)}", job_index=None, hint="")
            datatype = _NAMES[job.dtype]
            out = answer.outputs.add(name=name, datatype=datatype, shape=res.shape)
            target = entry[2] if len(entry) > 2 else None
            if target is not None:  # written into its shared-memory region: no data in the answer
                writes.append((target, res, _WIRE[job.dtype], name))
                for key, value in target.parameters().items():
                    set_parameter(out.parameters[key], value)
                raws.append(b"")
                continue
            data = np.ascontiguousarray(res, dtype=_WIRE[job.dtype]).reshape(-1).view(np.uint8).data
            if binary:
                raws.append(data)
                any_raw = True
                continue
            if datatype not in _TYPED:
                raise _bad(f"output {shown(name)}: {datatype} tensors travel only as raw_output_contents (the "
                           "protocol has no typed contents for them); leave parameters.binary_data unset", name)
            field = pb.InferTensorContents.DESCRIPTOR.fields_by_name[_TYPED[datatype][0]].number
            out.contents.MergeFromString(b"".join([_varint(field << 3 | 2), _varint(len(data)), data]))
            raws.append(b"")
        for target, res, wire, name in writes:
            target.write(res, wire, name)
        head = answer.SerializeToString()
        if not any_raw:
            return head
        parts: list[bytes | memoryview] = [head]
        for r in raws:
            parts += [_RAW_TAG, _varint(len(r)), r]
        return b"".join(parts)
