#!/usr/bin/env bash
# Builds the CPU image from the repository's Dockerfile with podman, runs it the way
# deploy/compose.yaml does (read-only root, tmpfs for /tmp and $HOME, all capabilities
# dropped), and checks it for real: the image's HEALTHCHECK turns healthy (podman's own
# health check run), a self-search chat through the `openai` SDK answers with a search, the
# processes run as the image's non-root user, and SIGTERM drains and exits 0. Then it removes
# what it made. Slow (a cold build is many minutes), so `make test` does not run it:
#
#   make image-test                  # or: bash deploy/image-test.sh
#
# It prints the figures docs/deploy.md records: build time, image size and layers, time from
# `podman run` to healthy, memory at idle.
#
# Environment:
#   SSRL_IMAGE_BASE    base image (default: a local Debian bookworm + Python 3.11 image, made
#                      with debootstrap when missing, since no image registry may be reachable)
#   SSRL_IMAGE_KEEP=1  keep the built image and the base image (a rerun then builds from cache)
#   SSRL_IMAGE_NO_CACHE=1  build every layer again (to time a cold build)
#   SSRL_IMAGE_WHEELS  a folder of wheels mounted into the build as PIP_FIND_LINKS (default:
#                      pip's own find-links setting, e.g. where the +cpu torch wheel lies)
#   SSRL_IMAGE_CA      CA bundle pip trusts in the build (default: pip's `cert` setting)
#   SSRL_IMAGE_TIMEOUT seconds to wait for healthy (default 900)
#   PYTHON             a python with the `openai` package (default .venv/bin/python)
#   PODMAN_RUNTIME     OCI runtime (default runc: crun fails on hybrid-cgroup hosts)
#   SSRL_IMAGE_RUN_ENV more -e settings for the container, space-separated, e.g.
#                      "SSRL_ENFORCE_EAGER=1" (start without torch.compile: seconds, not minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'image-test: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

if ! command -v podman >/dev/null 2>&1; then
    log "SKIP: podman is not installed (Debian: apt-get install podman runc debootstrap)"
    exit 0
fi
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import openai' 2>/dev/null; then
    log "SKIP: $PY has no openai package (run \`make setup\` first)"
    exit 0
fi

RUNTIME=${PODMAN_RUNTIME:-runc}
# The default ulimits cannot be raised in some sandboxes (rootless, nested): ask for less.
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
podman_() { podman --runtime "$RUNTIME" "$@"; }

tag="ssrl-image-test-$$-$RANDOM"
image="localhost/ssrl:$tag"
name="$tag"
BASE=${SSRL_IMAGE_BASE:-localhost/ssrl-base:bookworm-py311}
made_base=
tmp=$(mktemp -d)

cleanup() {
    local rc=$?
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    if [ "${SSRL_IMAGE_KEEP:-0}" != 1 ]; then
        podman rmi -f "$image" >/dev/null 2>&1 || true
        if [ -n "$made_base" ]; then podman rmi -f "$BASE" >/dev/null 2>&1 || true; fi
        podman image prune -f >/dev/null 2>&1 || true
    else
        log "kept $image (and $BASE)"
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT

# --- the base image ------------------------------------------------------------------------
if ! podman image exists "$BASE"; then
    [ -z "${SSRL_IMAGE_BASE:-}" ] || fail "base image $BASE does not exist"
    command -v debootstrap >/dev/null 2>&1 || { log "SKIP: no base image and no debootstrap"; exit 0; }
    [ "$(id -u)" = 0 ] || { log "SKIP: making the base image with debootstrap needs root"; exit 0; }
    mirror=$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "making $BASE: debootstrap bookworm from $mirror"
    started=$(date +%s)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -20 "$tmp/debootstrap.log" >&2; fail "debootstrap"; }
    rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*
    tar -C "$tmp/rootfs" -c . | podman import -q - "$BASE" >/dev/null
    rm -rf "$tmp/rootfs"
    made_base=1
    log "base image made in $(($(date +%s) - started)) s"
fi

# --- build -----------------------------------------------------------------------------------
# What pip on this machine knows and the build cannot (no registry answers for the +cpu torch,
# a TLS-inspecting proxy's CA) goes in as build arguments and read-only mounts, never as files
# of the image.
pip_setting() { pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.$1='\(.*\)'$/\1/p" | head -1; }
build_args=(--build-arg "BASE=$BASE" --build-arg VARIANT=cpu)
if [ "${SSRL_IMAGE_NO_CACHE:-0}" = 1 ]; then build_args+=(--no-cache); fi
wheels=${SSRL_IMAGE_WHEELS:-${PIP_FIND_LINKS:-$(pip_setting find-links)}}
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    build_args+=(-v "$(realpath "$wheels"):/run/ssrl-wheels:ro" --build-arg PIP_FIND_LINKS=/run/ssrl-wheels)
fi
ca=${SSRL_IMAGE_CA:-${PIP_CERT:-$(pip_setting cert)}}
if [ -n "$ca" ] && [ -f "$ca" ]; then
    build_args+=(-v "$(realpath "$ca"):/run/ssrl-ca.crt:ro" --build-arg PIP_CERT=/run/ssrl-ca.crt)
fi
log "building $image (from $BASE)"
started=$(date +%s)
# --format docker: the OCI image format has no HEALTHCHECK.
nice -n 10 podman --runtime "$RUNTIME" build --format docker "${ULIMITS[@]}" "${build_args[@]}" \
    -t "$image" -f Dockerfile . >"$tmp/build.log" 2>&1 \
    || { tail -40 "$tmp/build.log" >&2; fail "podman build"; }
build_s=$(($(date +%s) - started))
size=$(podman image inspect --format '{{.Size}}' "$image")
log "built in ${build_s} s; image size $((size / 1000000)) MB"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | cut -c1-150 >&2

health_cmd=$(podman image inspect --format '{{json .HealthCheck}}' "$image" 2>/dev/null || echo null)
[ "$health_cmd" != null ] && [ -n "$health_cmd" ] || fail "the image has no HEALTHCHECK"
user=$(podman image inspect --format '{{.Config.User}}' "$image")
[ "$user" = "10001:10001" ] || fail "image user is '$user', expected 10001:10001"

# --- run -------------------------------------------------------------------------------------
key="sk-test-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "running $name on 127.0.0.1:$port"
run_env=()
for setting in ${SSRL_IMAGE_RUN_ENV:-}; do run_env+=(-e "$setting"); done
started=$(date +%s)
# The same hardening and settings as deploy/compose.yaml's ssrl service.
podman_ run -d --name "$name" "${ULIMITS[@]}" \
    -p "127.0.0.1:$port:8000" \
    --read-only --tmpfs /tmp:rw,exec,mode=1777 --tmpfs /home/ssrl:rw,exec,mode=1777 --shm-size 1g \
    --cap-drop ALL --security-opt no-new-privileges \
    -e SSRL_API_KEY="$key" -e SSRL_MAX_MODEL_LEN=2048 -e SSRL_CPU_KVCACHE_SPACE=1 \
    -e SSRL_SHUTDOWN_GRACE=30 -e SSRL_LOG_LEVEL=info \
    ${run_env[@]+"${run_env[@]}"} "$image" >/dev/null 2>"$tmp/run.err" \
    || { cat "$tmp/run.err" >&2; fail "podman run"; }

timeout_s=${SSRL_IMAGE_TIMEOUT:-900}
status=
while :; do
    state=$(podman inspect --format '{{.State.Status}}' "$name")
    if [ "$state" != running ]; then
        podman logs "$name" 2>&1 | tail -40 >&2
        fail "the container stopped ($state) before it was healthy"
    fi
    # podman runs HEALTHCHECKs from systemd timers; without systemd, run it here.
    podman healthcheck run "$name" >/dev/null 2>&1 || true
    status=$(podman inspect --format '{{.State.Health.Status}}' "$name" 2>/dev/null \
        || podman inspect --format '{{.State.Healthcheck.Status}}' "$name")
    [ "$status" = healthy ] && break
    if [ $(($(date +%s) - started)) -gt "$timeout_s" ]; then
        podman logs "$name" 2>&1 | tail -40 >&2
        fail "not healthy after $timeout_s s (status: $status)"
    fi
    sleep 3
done
healthy_s=$(($(date +%s) - started))
log "healthy $healthy_s s after podman run"

# --- checks ----------------------------------------------------------------------------------
# Every process of the container runs as the image's user, none as root.
users=$(podman top "$name" user huser | tail -n +2 | awk '{print $1 "/" $2}' | sort -u)
log "process users (container/host): $(echo "$users" | tr '\n' ' ')"
if echo "$users" | grep -qE '(^|/)(root|0)($|/)'; then fail "a process runs as root"; fi
[ "$(podman exec "$name" id -u)" = 10001 ] || fail "exec'd process is not uid 10001"

# A self-search chat through the official SDK: the answer, and a search over the baked index.
SSRL_BASE_URL="http://127.0.0.1:$port/v1" SSRL_API_KEY="$key" "$PY" - <<'EOF' || fail "chat"
import os

import openai

base, key = os.environ["SSRL_BASE_URL"], os.environ["SSRL_API_KEY"]
try:
    openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0).models.list()
except openai.AuthenticationError:
    pass
else:
    raise SystemExit("a wrong API key was accepted")
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
model = client.models.list().data[0].id
response = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
    temperature=0,
    max_tokens=64,
    extra_body={"self_search": {"policy": "always", "max_turns": 1, "docs_per_search": 2}},
)
choice = response.choices[0]
searches = (choice.model_extra or {}).get("self_search", {}).get("searches", [])
assert searches, f"no search in the trace: {choice.model_extra}"
documents = [d for s in searches for d in s.get("documents", [])]
assert documents, f"the search found no document in the baked index: {searches}"
assert choice.message.content, "empty answer"
print(f"image-test: chat ok: model {model}, {len(searches)} search(es), {len(documents)} document(s),",
      f"{response.usage.completion_tokens} tokens: {choice.message.content[:80]!r}")
EOF

# Memory at idle: the container's whole process tree, RSS summed on the host (podman stats
# needs a cgroup set-up that not every host has).
sleep 10
pid=$(podman inspect --format '{{.State.Pid}}' "$name")
tree() { echo "$1"; for child in $(pgrep -P "$1"); do tree "$child"; done; }
rss_kb=0
for p in $(tree "$pid"); do rss_kb=$((rss_kb + $(ps -o rss= -p "$p" 2>/dev/null || echo 0))); done
log "idle memory (RSS of the process tree): $((rss_kb / 1024)) MiB"
stats=$(podman stats --no-stream --format '{{.MemUsage}}' "$name" 2>/dev/null || true)
[ -z "$stats" ] || log "podman stats: $stats"

# --- SIGTERM: drain and exit -----------------------------------------------------------------
# A chat is in flight when SIGTERM comes: it must finish (the drain), and the server exit 0.
SSRL_BASE_URL="http://127.0.0.1:$port/v1" SSRL_API_KEY="$key" "$PY" - >"$tmp/inflight.log" 2>&1 <<'EOF' &
import os

import openai

client = openai.OpenAI(base_url=os.environ["SSRL_BASE_URL"], api_key=os.environ["SSRL_API_KEY"], max_retries=0)
stream = client.chat.completions.create(
    model=client.models.list().data[0].id,
    messages=[{"role": "user", "content": "Tell me about the history of Paris."}],
    max_tokens=48,
    temperature=0,
    stream=True,
    extra_body={"self_search": {"enabled": False}},
)
chunks = 0
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        chunks += 1
        if chunks == 1:
            print("streaming", flush=True)  # the shell sends SIGTERM now
print(f"the chat in flight at SIGTERM finished: {chunks} chunk(s)")
EOF
inflight=$!
for _ in $(seq 300); do
    grep -q streaming "$tmp/inflight.log" 2>/dev/null && break
    kill -0 "$inflight" 2>/dev/null || break
    sleep 0.2
done
grep -q streaming "$tmp/inflight.log" || { cat "$tmp/inflight.log" >&2; fail "the chat to drain did not start"; }
started=$(date +%s)
podman kill --signal TERM "$name" >/dev/null
code=$(timeout 120 podman wait "$name") || fail "did not exit within 120 s of SIGTERM"
stop_s=$(($(date +%s) - started))
podman logs "$name" >"$tmp/run.log" 2>&1
if wait "$inflight"; then
    log "$(tail -1 "$tmp/inflight.log")"
else
    tail -5 "$tmp/inflight.log" >&2
    fail "the request in flight at SIGTERM did not finish"
fi
[ "$code" = 0 ] || { tail -20 "$tmp/run.log" >&2; fail "exit code $code after SIGTERM"; }
# ssrl's own "signal 15: draining N request(s)" line, else uvicorn's end of shutdown.
line=$(grep -oE 'draining [0-9]+ request.*|Finished server process.*' "$tmp/run.log" | head -1) \
    || { tail -20 "$tmp/run.log" >&2; fail "no shutdown log line after SIGTERM"; }
log "SIGTERM: '$line'; exited 0 in $stop_s s"

log "PASS: build ${build_s} s, image $((size / 1000000)) MB, healthy after ${healthy_s} s," \
    "idle RSS $((rss_kb / 1024)) MiB, stop ${stop_s} s"
