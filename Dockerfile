# funnel-kpi image: the worker (`funnel-kpi worker`, default), the webhook receiver
# (`funnel-kpi ingest`) and the adapter (`funnel-kpi adapt`), used by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies exactly as locked, hash-checked (regenerate with `make lock`); then the
# package alone. Only what the package needs (see .dockerignore). The image's models/funnel.yaml
# is the default funnel config; docker-compose.yml mounts the host's file (FUNNEL_CONFIG_FILE).
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY processors ./processors
COPY streams ./streams
COPY models ./models
COPY sinks ./sinks
RUN pip install --no-deps .

# OCI labels (docs/releasing.md). A release build passes VERSION (the tag without its "v"),
# REVISION (the commit), CREATED (RFC 3339) and SOURCE (the repository URL); a VERSION other
# than the package's (pyproject.toml) stops the build, so an image never claims another version.
# Local builds (docker compose) leave VERSION=local.
ARG VERSION=local
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
RUN installed="$(python -c 'from streams.version import VERSION; print(VERSION)')" \
    && { [ "$VERSION" = local ] || [ "$VERSION" = "$installed" ] \
         || { echo "VERSION=$VERSION but the package is $installed (pyproject.toml)" >&2; exit 1; }; }
LABEL org.opencontainers.image.title="funnel-kpi" \
      org.opencontainers.image.description="Real-time sales-funnel KPIs from CRM change events (Kafka, Faust, Prometheus)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# Unprivileged user in a root-owned /app: it writes only where it owns the directory. RocksDB
# state and Faust data live in /data (a volume per worker), backfill checkpoints in
# /var/lib/funnel-kpi/backfill (the compose volume backfill-state: a new named volume takes this
# directory's owner, so the user can write it).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin funnel \
    && mkdir -p /data /var/lib/funnel-kpi/backfill \
    && chown funnel /data /var/lib/funnel-kpi/backfill
USER funnel

ENV FUNNEL_DATA_DIR=/data \
    FUNNEL_BACKFILL_STATE_DIR=/var/lib/funnel-kpi/backfill \
    FUNNEL_WEB_PORT=6066
VOLUME ["/data"]
EXPOSE 6066 6067 8000

CMD ["funnel-kpi", "worker"]
