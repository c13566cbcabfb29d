# syntax=docker/dockerfile:1
# The one Vigil image: `vigil run` (default), `vigil db upgrade`, `vigil worker`.
# docker-compose.yml builds it once and runs it as the migrate, api and worker services.
FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIGIL_HOST=0.0.0.0 \
    VIGIL_DATA_DIR=/var/lib/vigil

WORKDIR /app
COPY pyproject.toml alembic.ini ./
COPY service ./service
COPY telemetry ./telemetry
COPY migrations ./migrations
# Editable on purpose: service.db.migrate finds alembic.ini and migrations/ at the
# repository root (/app), exactly as in a checkout.
RUN pip install -e . && vigil --help >/dev/null

RUN groupadd --system --gid 10001 vigil \
 && useradd --system --uid 10001 --gid vigil --home-dir /var/lib/vigil --shell /usr/sbin/nologin vigil \
 && install -d -o vigil -g vigil -m 0750 /var/lib/vigil
USER vigil:vigil
# 8000: the API, /metrics and /health/*; 9101: the worker's metrics port.
EXPOSE 8000 9101
# No HEALTHCHECK here: the same image runs the API, the worker and one-shot migrations, each
# probed differently; docker-compose.yml defines one per long-running service.
CMD ["vigil", "run"]
