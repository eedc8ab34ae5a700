# The build container: `python -m worker <deployment-id>` clones, installs, builds and uploads
# one deployment (the ECS runner passes the id and the lease holder as the container command).
# Node 22 LTS: Debian bookworm's nodejs is 18, which cannot run Vite 7 or Next 15.
FROM node:22-bookworm-slim

# No user namespaces on Fargate, so no bubblewrap: the task is the sandbox, and the untrusted
# commands run as the unprivileged `node` account (DEPLOYHUB_SANDBOX=user), on the task's
# network (its security group decides what that reaches).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DEPLOYHUB_DATA_DIR=/work PATH=/opt/deployhub/bin:$PATH \
    DEPLOYHUB_SANDBOX=user DEPLOYHUB_BUILD_USER=node DEPLOYHUB_BUILD_NETWORK=host

# git clones, python3 runs the worker (as root, to hand each command to `node`).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/deployhub \
    && mkdir -p /work && chmod 0711 /work

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY deployhub ./deployhub
COPY worker ./worker
COPY web ./web
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /work
ENTRYPOINT ["python", "-m", "worker"]
