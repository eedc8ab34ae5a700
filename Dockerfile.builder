# The build container: `python -m worker <deployment-id>` clones, installs, builds and uploads
# one deployment. The worker runs as root only to hand the untrusted steps to bubblewrap and
# an unprivileged user; they never see its environment (Redis and storage credentials).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DEPLOYHUB_DATA_DIR=/work

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git bubblewrap ca-certificates nodejs npm \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/build build

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY deployhub ./deployhub
COPY worker ./worker
COPY web ./web
RUN pip install .

WORKDIR /work
ENTRYPOINT ["python", "-m", "worker"]
