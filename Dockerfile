# kaiko-bridge: multi-stage, slim, non-root, read-only-root-filesystem friendly.
ARG EXTRAS=fast

FROM python:3.11-slim AS build
ARG EXTRAS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

FROM python:3.11-slim
ARG EXTRAS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "kaiko-bridge[${EXTRAS}]" \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bridge
USER 10001:10001
EXPOSE 8080
# Nothing is written to the filesystem at run time: the root can be mounted read-only.
ENTRYPOINT ["kaiko-bridge"]
CMD ["run", "--config", "/etc/kaiko-bridge/config.yaml"]
