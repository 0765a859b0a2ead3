"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, KServe v2 / Triton).

``codec``: a ``ModelInferRequest`` into the ``/v2`` decoding (same checks, same messages) and the
results into a ``ModelInferResponse``; ``server``: the ``grpc.aio`` server the app's lifespan starts
and stops. The message types and service descriptors are the generated ones ``tritonclient[grpc]``
ships (``tritonclient.grpc.service_pb2``).
"""
