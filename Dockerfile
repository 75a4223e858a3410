# fedhe images, one per role, from this one file. Build from the repository root (the context must
# be the root); ROLE picks the role's lock (requirements/<ROLE>.lock) and its final stage below:
#   docker build --build-arg ROLE=keyserver  --build-arg VERSION=<v> -t <registry>/fedhe-keyserver:<v> .
#   docker build --build-arg ROLE=aggregator --build-arg VERSION=<v> -t <registry>/fedhe-aggregator:<v> .
#   docker build --build-arg ROLE=agent      --build-arg VERSION=<v> -t <registry>/fedhe-client-agent:<v> .
# `make images` runs these with <v> the version in pyproject.toml (the build fails if they differ).
# The aggregator and keyserver locks hold no TensorFlow, tensorflow-privacy or pydicom.
# Settings come from FEDHE_<ROLE>_* environment variables at run time; no secret is baked in.
# Secrets are mounted as files and named by the *_FILE variables (see deploy/helm/fedhe).

# keyserver, aggregator or agent (no default: the build fails without it).
ARG ROLE

# ---- builder: the role's locked dependency set and the fedhe distribution, in a virtualenv ---
FROM python:3.11.7-slim-bookworm AS builder
ARG ROLE
ARG VERSION=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, so this (large, for the agent) layer is reused until the lock changes. Every
# transitive pin is hash-checked; each lock also pins setuptools, the build backend below.
COPY requirements/${ROLE}.lock requirements/role.lock
RUN pip install --require-hashes -r requirements/role.lock

# The project itself (one distribution; the role's extra is what the lock above installed).
# --no-build-isolation builds with the hash-checked setuptools instead of fetching an unverified one.
# A VERSION given for the label must be the distribution's own.
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ services/
RUN pip install --no-deps --no-build-isolation . \
    && fedhe --help > /dev/null \
    && if [ -n "$VERSION" ]; then python -c "import fedhe; assert fedhe.__version__ == '$VERSION', fedhe.__version__"; fi

# ---- runtime: the interpreter, the virtualenv and an unprivileged user; no compilers ---------
FROM python:3.11.7-slim-bookworm AS runtime
ARG VERSION=""

LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 fedhe \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/fedhe --create-home \
       --shell /usr/sbin/nologin fedhe

COPY --from=builder /opt/venv /opt/venv

# The root filesystem is read-only in Kubernetes: no bytecode writes at run time (pip
# precompiled it). TMPDIR is where the HE codec falls back to when /dev/shm is not writable.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp

ENTRYPOINT ["fedhe"]

# ---- keyserver -------------------------------------------------------------------------------
FROM runtime AS keyserver
LABEL org.opencontainers.image.title="fedhe-keyserver" \
      org.opencontainers.image.description="fedhe keyserver: holds each federation's HE keys (packed BFV by default, CKKS optional), releases secret contexts to approved sites"
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/fedhe
ENV FEDHE_KEYSERVER_HOST=0.0.0.0 \
    FEDHE_KEYSERVER_PORT=8090
WORKDIR /var/lib/fedhe
USER 10001:10001
EXPOSE 8090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["fedhe", "keyserver", "check"]
CMD ["keyserver"]

# ---- aggregator ------------------------------------------------------------------------------
FROM runtime AS aggregator
LABEL org.opencontainers.image.title="fedhe-aggregator" \
      org.opencontainers.image.description="fedhe aggregator: coordinates rounds and sums encrypted updates (FedAvg under packed BFV by default, CKKS optional)"
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/fedhe
ENV FEDHE_AGGREGATOR_HOST=0.0.0.0 \
    FEDHE_AGGREGATOR_PORT=8080
WORKDIR /var/lib/fedhe
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["fedhe", "aggregator", "check"]
CMD ["aggregator"]

# ---- agent (the fedhe-client-agent image, run at each site) -----------------------------------
FROM runtime AS agent
LABEL org.opencontainers.image.title="fedhe-client-agent" \
      org.opencontainers.image.description="fedhe site agent: trains locally with DP-SGD and uploads encrypted updates"
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/fedhe-agent
ENV HOME=/tmp \
    FEDHE_AGENT_STATE_DIR=/var/lib/fedhe-agent
WORKDIR /var/lib/fedhe-agent
USER 10001:10001
# The agent only makes outbound calls: no port to expose and no HTTP endpoint to probe.
HEALTHCHECK NONE
CMD ["agent"]

# ---- the image: the stage ROLE names ----------------------------------------------------------
FROM ${ROLE}
