# The archive_kms image: Prefect worker, Prefect server, and the archive-kms CLI (the
# operator console today), one image. Built from this repository:
#
#   docker build -t archive-kms:dev .
#
# Commands (infra/docker/entrypoint.py): `worker`, `prefect-server`, `deploy`,
# `keyvault-emulator` (local compose only), `health`, or anything else verbatim
# (`archive-kms status`, ...). Runs as an unprivileged user.

# The base image, pinned by exact tag in both stages (change both together; add
# @sha256:<digest> where your registry mirror records it).
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/archive-kms
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY flows ./flows
RUN /opt/archive-kms/bin/pip install ".[postgres,dask]"

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="archive-kms" \
      org.opencontainers.image.description="Moves a tenant's archive onto the tenant's own key"
ENV PATH=/opt/archive-kms/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/home/archivekms/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
RUN groupadd --system --gid 10001 archivekms \
    && useradd --system --uid 10001 --gid archivekms --home-dir /home/archivekms --create-home archivekms
COPY --from=build /opt/archive-kms /opt/archive-kms
WORKDIR /app
# prefect.yaml deployments name flows/migration.py relative to this directory
COPY flows ./flows
COPY localstack/keyvault_emulator.py ./localstack/keyvault_emulator.py
COPY infra/docker/entrypoint.py /usr/local/bin/archive-kms-entrypoint
# volumes mounted here (docker-compose.yml) start owned by the unprivileged user
RUN chmod 0755 /usr/local/bin/archive-kms-entrypoint \
    && mkdir -p /var/lib/archive-kms /var/lib/keyvault \
    && chown -R archivekms:archivekms /app /var/lib/archive-kms /var/lib/keyvault
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["archive-kms-entrypoint", "health"]
ENTRYPOINT ["archive-kms-entrypoint"]
CMD ["worker"]
