# easelbot: the bot, its job queue and the GPU engine in one image. See docs/operations.md.
#
#   docker build -t easelbot .
#   docker run --gpus all --init --stop-timeout 45 -v easelbot-data:/data -p 127.0.0.1:8080:8080 \
#       -e EASELBOT_API_KEYS=... -e DISCORD_TOKEN=... easelbot
#
# torch comes from PyPI: its Linux x86_64 wheels are CUDA builds that bundle their own CUDA
# libraries (as pip packages), so the base image only has to provide the NVIDIA container hooks
# (NVIDIA_* variables, CUDA compat) of the same CUDA major version; the small `base` flavour is
# enough and a `runtime`/`cudnn-runtime` one would only duplicate gigabytes of libraries. The
# host driver must support the CUDA version of the torch wheel. For an older driver, build with
# a CUDA 12 base and torch from PyTorch's CUDA 12 wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t easelbot .
#
# Secrets (DISCORD_TOKEN, SLACK_*, EASELBOT_API_KEYS, REDIS_PASSWORD) are never baked in: pass
# them at run time as environment variables.

ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
# Empty: torch from PyPI (the default `pip install torch`). A URL: torch from that wheel index.
ARG TORCH_INDEX_URL=""
ARG DEBIAN_FRONTEND=noninteractive

LABEL org.opencontainers.image.title="easelbot" \
      org.opencontainers.image.description="A self-hosted Discord/Slack bot that lets a community share one GPU for Stable Diffusion." \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's python3 is 3.12, which PyPI's torch CUDA wheels support; sqlite3 is for backups.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv sqlite3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid, so a bind-mounted /data can be chowned to it on the host (chown -R 10001:10001).
RUN groupadd --gid 10001 easelbot \
    && useradd --uid 10001 --gid easelbot --no-log-init --create-home --home-dir /home/easelbot \
        --shell /usr/sbin/nologin easelbot

ENV VIRTUAL_ENV=/opt/easelbot \
    PATH=/opt/easelbot/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, from pyproject.toml alone: this multi-GB layer is rebuilt only when the
# dependency list changes, not on every source edit.
WORKDIR /usr/src/easelbot
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/easelbot \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
            "$(grep -E '^torch([<>=!~ ;]|$)' /tmp/requirements.txt)"; \
    fi \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself, without touching the dependency layer.
COPY bot/ bot/
COPY engine/ engine/
COPY config.example.toml ./
RUN pip install --no-cache-dir --no-deps . \
    && easelbot --help > /dev/null

# /data is the one volume: easelbot.db (+ -wal, -shm), outputs/, models/ (HF_HOME), compile-cache/
# (torch.compile's kernels, so a restart does not compile the UNet buckets from scratch) and the config.
# The config is config.example.toml listening on all interfaces of the container (so a published
# port reaches it; that makes EASELBOT_API_KEYS required). A fresh named volume is filled from
# here, so `-v easelbot-data:/data` starts with this config; a bind mount needs its own copy.
RUN mkdir -p /data/models /data/outputs /data/compile-cache /run/easelbot \
    && sed 's/^host = "127.0.0.1"$/host = "0.0.0.0"/' config.example.toml > /data/easelbot.toml \
    && grep -q '^host = "0.0.0.0"$' /data/easelbot.toml \
    && easelbot config check /data/easelbot.toml \
    && chown -R easelbot:easelbot /data /run/easelbot

ENV HF_HOME=/data/models \
    TORCHINDUCTOR_CACHE_DIR=/data/compile-cache \
    HF_HUB_DISABLE_TELEMETRY=1 \
    EASELBOT_CONFIG=/data/easelbot.toml

# Numeric, so a runtime that checks for non-root (runAsNonRoot) can verify it: 10001 is easelbot.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
STOPSIGNAL SIGTERM

# Liveness only: /healthz answers as soon as the web server is up, while models may still load
# (/readyz says when the engine is ready). No proxy, so HTTP_PROXY cannot divert the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/easelbot/bin/python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["easelbot"]
CMD ["run"]
