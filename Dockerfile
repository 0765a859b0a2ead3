# surrogate-serve container image. Operator guide: docs/deploy.md.
#
#   docker build -t surrogate-serve:cpu .                                   # CPU (default)
#   docker build -t surrogate-serve:cuda --build-arg VARIANT=cuda .         # NVIDIA GPUs (CUDA 12 wheels)
#
# Build arguments:
#   BASE        the image every stage starts from. Any Debian/Ubuntu-like image with Python >= 3.11 works
#               (python:3.11-slim-bookworm by default); a plain Debian image without Python works too:
#               python3 is then installed with apt (CI builds from a locally made debian:bookworm rootfs).
#   VARIANT     cpu (default) or cuda: cuda adds JAX's CUDA wheels (jax[$CUDA_EXTRA] at the locked jax
#               version; the wheels bring CUDA, cuDNN and NCCL, the host needs only the NVIDIA driver).
#   CUDA_EXTRA  JAX's pip extra for the CUDA variant: cuda12 (default) or cuda13.
#
# Optional build secret "pipcert": a CA bundle for pip, for networks that intercept TLS:
#   docker build --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt .
# It is mounted only while pip runs and never stored in a layer.
#
# Dependencies are exactly those of requirements.lock (installed with --no-deps, so nothing unpinned slips
# in); the build backend is pinned in deploy/requirements-build.txt.

ARG BASE=python:3.11-slim-bookworm
ARG VARIANT=cpu

# ---------------------------------------------------------------------------------------------------------
# base: the chosen base image plus a Python >= 3.11 interpreter (nothing else).
FROM ${BASE} AS base
# DL3008: Debian package versions are not pinned because the pinned versions disappear from the mirrors
# with every security update (the build would break); the suite (bookworm) pins the major versions.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt \
                  /var/log/dpkg.log; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed, the base has " + sys.version'

# ---------------------------------------------------------------------------------------------------------
# deps: the locked dependencies in the virtual environment /opt/venv (without pip), installed with a pinned
# pip and setuptools kept apart in /opt/tools. Rebuilt only when requirements.lock changes, so code changes
# reuse this big layer (and so does the runtime stage's copy of it). NumPy's and SciPy's own test suites
# (about 45 MB) are left out of the image.
FROM base AS deps
ARG VARIANT
ARG CUDA_EXTRA=cuda12
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian's python3 has no ensurepip without python3-venv (python:*-slim images have it). DL3008: as above.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi \
    && python3 -m venv /opt/tools \
    && python3 -m venv --without-pip /opt/venv
WORKDIR /src
COPY requirements.lock deploy/requirements-build.txt ./
RUN --mount=type=secret,id=pipcert \
    set -eu; \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi; \
    /opt/tools/bin/pip install --no-cache-dir -r requirements-build.txt; \
    pip="/opt/tools/bin/pip --python /opt/venv/bin/python"; \
    $pip install --no-cache-dir --no-deps -r requirements.lock; \
    case "$VARIANT" in \
      cpu) ;; \
      cuda) jax_version="$(sed -n 's/^jax==//p' requirements.lock)"; \
            test -n "$jax_version"; \
            $pip install --no-cache-dir -c requirements.lock "jax[$CUDA_EXTRA]==$jax_version" ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;; \
    esac; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    find "$site/numpy" "$site/scipy" -depth -type d -name tests -exec rm -rf {} +; \
    echo /opt/app > "$site/surrogate-serve-app.pth"

# ---------------------------------------------------------------------------------------------------------
# app: the project's own packages, installed into /opt/app (on /opt/venv's path through the .pth above).
FROM deps AS app
# .dockerignore lets only the packages and their metadata through.
COPY . .
RUN /opt/tools/bin/pip install --no-cache-dir --no-deps --no-build-isolation --target /opt/app . \
    && rm -rf /opt/app/bin \
    && /opt/venv/bin/python -I -c 'import service, surrogate_core'

# ---------------------------------------------------------------------------------------------------------
# runtime: the interpreter, the virtual environment and an unprivileged user; no compilers, no pip.
FROM base AS runtime
ARG VARIANT
RUN useradd --no-log-init --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin surrogate
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
# JAX_PLATFORMS: the variant's name is JAX's platform name (cpu, cuda): JAX uses that platform and fails
# loudly instead of falling back to the CPU when a CUDA image sees no GPU ("cuda,cpu" allows the fallback).
# XLA_PYTHON_CLIENT_PREALLOCATE=false (GPU only): JAX would preallocate 75 % of the GPU's memory per
# process, which fails with SURROGATE_WORKERS > 1 or a shared GPU; cap with XLA_CLIENT_MEM_FRACTION
# (docs/deploy.md, "GPU memory").
# SURROGATE_GRACEFUL_TIMEOUT=8 fits the shortest common stop grace period (docker stop: 10 s); compose
# and Kubernetes give more time and raise it (docs/deploy.md, "Graceful shutdown").
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    JAX_PLATFORMS=${VARIANT} \
    XLA_PYTHON_CLIENT_PREALLOCATE=false \
    SURROGATE_HOST=0.0.0.0 \
    SURROGATE_PORT=8000 \
    SURROGATE_GRACEFUL_TIMEOUT=8
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001
# uvicorn finishes in-flight requests on SIGTERM (for up to SURROGATE_GRACEFUL_TIMEOUT seconds).
STOPSIGNAL SIGTERM
# Healthy = ready: /readyz answers 200 once the JAX warm-up has compiled (503 before). No curl in the
# image: the check uses the image's own Python.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:' + os.environ.get('SURROGATE_PORT', '8000') + '/readyz', timeout=4)"]
CMD ["/opt/venv/bin/python", "-m", "service"]
LABEL org.opencontainers.image.title="surrogate-serve" \
      org.opencontainers.image.description="Spikes and surrogate gradients of spiking neural networks over HTTP (JAX)" \
      org.opencontainers.image.licenses="Apache-2.0"
