"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP), with Triton's binary tensor data extension."""
