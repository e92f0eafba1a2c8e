# kaiko-bridge: multi-stage, slim, non-root, read-only-root-filesystem friendly.
# The base image is pinned by version and digest; the dependencies come from a lock file
# with hashes (requirements.lock; `make lock` renews it); tini runs as PID 1, so SIGTERM
# reaches the bridge and its receiver processes are reaped.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
COPY dev ./dev
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . ./dev

FROM ${PYTHON_IMAGE}
# LOCK: requirements.lock (the service) or requirements-sim.lock (adds the simulators' CA);
# WHEELS: the service's wheel alone, or "*.whl" to add the simulators (kaiko-bridge-dev)
ARG LOCK=requirements.lock
ARG WHEELS=kaiko_bridge-*.whl
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kaiko-bridge" \
      org.opencontainers.image.description="Vinter NAV and Kaiko VWAP market data onto Kafka as schema-versioned CloudEvents" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
COPY ${LOCK} /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-deps /wheels/${WHEELS} \
 && rm -rf /wheels /tmp/requirements.lock \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bridge \
 && install -d -o 10001 -g 10001 /var/lib/kaiko-bridge
USER 10001:10001
EXPOSE 8080
# Nothing is written to the filesystem at run time: the root can be mounted read-only.
ENTRYPOINT ["tini", "--", "kaiko-bridge"]
CMD ["run", "--config", "/etc/kaiko-bridge/config.yaml"]
