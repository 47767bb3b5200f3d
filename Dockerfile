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
COPY pyproject.toml README.md ./
COPY processors ./processors
COPY streams ./streams
COPY models ./models
COPY sinks ./sinks
RUN pip install --no-deps .

# Unprivileged user; RocksDB state and Faust data live in /data (a volume per worker).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin funnel \
    && mkdir -p /data \
    && chown funnel /data
USER funnel

ENV FUNNEL_DATA_DIR=/data \
    FUNNEL_WEB_PORT=6066
VOLUME ["/data"]
EXPOSE 6066 6067 8000

CMD ["funnel-kpi", "worker"]
