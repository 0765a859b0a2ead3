"""``inference.GRPCInferenceService`` on ``grpc.aio``, in the app's event loop.

``start(rt)`` binds ``SURROGATE_HOST:SURROGATE_GRPC_PORT`` and serves until ``stop``; the app's
lifespan calls both, so an embedded app and every ``--workers`` process serve gRPC as they serve
HTTP (the workers share the port through ``SO_REUSEPORT``, as they share the HTTP listener; a
single process binds it alone, so that a port in use is an error at start).

Per call, as over HTTP: the bearer token (``authorization`` metadata; ServerLive and ServerReady
stay open, as ``/v2/health/*`` do), ``ModelInfer`` through the data plane (admission, memory,
limits, batching: ``DataPlane.serve`` with ``GrpcCodec``), one metrics record per call (endpoint:
the method's path, protocol ``grpc``, status: the HTTP status the same outcome has on ``/v2``).
Every error is a gRPC status whose details are the message ``/v2`` gives: INVALID_ARGUMENT for bad
input, NOT_FOUND for an unknown model or version, UNAVAILABLE when overloaded, warming up or
shutting down, RESOURCE_EXHAUSTED for a request larger than the memory budget (gRPC itself refuses
a message over ``SURROGATE_MAX_BODY_BYTES`` with RESOURCE_EXHAUSTED before it reaches the service),
DEADLINE_EXCEEDED past ``SURROGATE_REQUEST_TIMEOUT``, UNAUTHENTICATED without the token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

import surrogate_core as core

from ... import __version__
from ...compute import release
from ...errors import ApiError
from ...server.lifecycle import is_shutting_down
from ...server.security import check_token
from ..shm import off_error
from ..v2 import codec as v2
from .codec import GrpcCodec, GrpcRequest

__all__ = ["SERVICE", "grpc_code", "start", "stop"]

log = logging.getLogger("service.grpc")

SERVICE = "inference.GRPCInferenceService"
_OPEN = frozenset({"ServerLive", "ServerReady"})  # no token needed, as /v2/health/*


def grpc_code(err: ApiError) -> grpc.StatusCode:
    """The gRPC status of an error the service raised (with its HTTP status)."""
    if err.status == 401:
        return grpc.StatusCode.UNAUTHENTICATED
    if err.status == 404:
        return grpc.StatusCode.NOT_FOUND
    if err.code == "shared_memory_off":  # an extension this server does not offer now
        return grpc.StatusCode.UNIMPLEMENTED
    if err.code == "timeout":
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if err.status == 503:
        return grpc.StatusCode.UNAVAILABLE
    if err.status == 413 or (err.code in ("too_large", "body_too_large") and err.reason == "memory"):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if 400 <= err.status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _status(err: ApiError) -> int:
    return {422: 400, 406: 400}.get(err.status, err.status)  # as /v2 answers it


class Service:
    """The RPCs, over the runtime ``rt`` (``service.state.Runtime``)."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.codec = GrpcCodec(rt.dataplane.limits, rt.shm)

    # -- the calls --------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.rt.ready.is_set() and not is_shutting_down())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        extensions = ["model_repository", "statistics"]
        if self.rt.shm is not None:
            extensions.append("system_shared_memory")
        return pb.ServerMetadataResponse(name="surrogate-serve", version=__version__, extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        meta = v2.describe_model(v2.model(request.name, request.version or None), self.rt.settings.max_rank)
        tensors = lambda ts: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in ts]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        v2.model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.rt.ready.is_set())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        ready = self.rt.ready.is_set()
        if request.ready and not ready:
            return pb.RepositoryIndexResponse()
        state = "READY" if ready else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=s.name, version=v2.VERSION, state=state, reason="")
            for s in core.all_surrogates()
        ])

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        stats = self.rt.dataplane.stats.snapshot(request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        regions = self._shm().status(request.name or None)
        return pb.SystemSharedMemoryStatusResponse(regions={
            r["name"]: pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r["name"], key=r["key"], offset=r["offset"], byte_size=r["byte_size"])
            for r in regions
        })

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self._shm().register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._shm().unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def ModelInfer(self, body: bytes) -> bytes:
        dp = self.rt.dataplane
        with dp.admission() as ticket:
            ticket.require(len(body), f"a request body of {len(body)} bytes", status=413)
            return await dp.serve(self.codec, GrpcRequest(), body, ticket)

    # -- helpers ----------------------------------------------------------------------------
    def _shm(self) -> Any:
        if self.rt.shm is None:
            raise off_error(code="shared_memory_off")
        return self.rt.shm


def _handler(rt: Any, name: str, call: Callable[[Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """One RPC with what every call gets: the token, the drain, errors as statuses, the metrics."""
    digests = rt.token_digests
    metrics = rt.dataplane.metrics
    label = f"/{SERVICE}/{name}"
    open_call = name in _OPEN
    infer = name == "ModelInfer"

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        t0 = time.perf_counter()
        status = 500
        err: ApiError | None = None
        try:
            if digests and not open_call:
                check_token(digests, _metadata(context, "authorization"))
            if infer and is_shutting_down():
                raise ApiError(503, "the server is shutting down; retry on another instance", code="unavailable")
            answer = await call(request)
            status = 200
            return answer
        except ApiError as exc:
            request = None
            release(exc)
            err = exc
            if err.reason:
                metrics.reject(err.reason)
            status = _status(err)
        except asyncio.CancelledError:  # the client went away or its deadline passed: counted as 499, as over HTTP
            request = None
            status = 499
            metrics.reject("client_disconnect")
            raise
        except Exception as exc:
            request = None
            log.exception("unhandled error on %s", label)
            release(exc)
            err = ApiError(500, "internal error; the server log has the details")
        finally:
            metrics.observe_request(label, "grpc", status, time.perf_counter() - t0)
        await context.abort(grpc_code(err), err.message)  # raises: the call ends with this status

    return handle


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def _handlers(rt: Any) -> grpc.GenericRpcHandler:
    svc = Service(rt)
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                 "ModelStatistics", "RepositoryIndex", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
                 "SystemSharedMemoryUnregister"):
        method = methods[name]
        request_type = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
        raw = name == "ModelInfer"  # bytes in and out: the codec parses and writes the messages itself
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _handler(rt, name, getattr(svc, name)),
            request_deserializer=None if raw else _parser(request_type),
            response_serializer=None if raw else _serialize,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _parser(descriptor: Any) -> Callable[[bytes], Any]:
    cls = getattr(pb, descriptor.name)
    return cls.FromString


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(rt: Any) -> grpc.aio.Server | None:
    """The gRPC server of the runtime ``rt``, started (None when ``SURROGATE_GRPC_PORT`` is 0)."""
    s = rt.settings
    if not s.grpc_port:
        return None
    server = grpc.aio.server(
        handlers=[_handlers(rt)],
        options=[
            ("grpc.max_receive_message_length", s.max_body_bytes),  # the body limit, as over HTTP
            ("grpc.max_send_message_length", -1),  # answers are bounded by the memory budget
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ],
    )
    address = _address(s.host, s.grpc_port)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address} (SURROGATE_GRPC_PORT): {exc}") from None
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server


async def stop(server: grpc.aio.Server | None, grace: float) -> None:
    """Stop taking calls, and let those in progress finish for up to ``grace`` seconds."""
    if server is not None:
        await server.stop(grace)
