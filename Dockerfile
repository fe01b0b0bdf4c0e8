# tmem broker: `docker build -t tmem-broker .` then
#   docker run -p 8470:8470 -v tmem-data:/var/lib/tmem tmem-broker
# The admin token is generated into the volume at first start (or pass -e TMEM_ADMIN_TOKEN=...).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY broker ./broker
COPY guest_agent ./guest_agent
# the broker needs its [server] extra (the base install is the guest agent alone); './[server]'
# rather than '.[server]': hadolint's DL3013 takes the latter for an unpinned package
RUN pip install './[server]'

FROM python:3.11-slim
RUN groupadd --system --gid 10001 tmem \
    && useradd --system --uid 10001 --gid tmem --home-dir /var/lib/tmem --shell /usr/sbin/nologin tmem \
    && mkdir -p /var/lib/tmem \
    && chown tmem:tmem /var/lib/tmem
COPY --from=build /opt/venv /opt/venv
COPY alembic.ini /app/alembic.ini
COPY migrations /app/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TMEM_HOST=0.0.0.0 \
    TMEM_PORT=8470 \
    TMEM_DATA_DIR=/var/lib/tmem \
    TMEM_MIGRATIONS_DIR=/app/migrations
WORKDIR /app
USER 10001:10001
VOLUME ["/var/lib/tmem"]
EXPOSE 8470
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TMEM_PORT', '8470'), timeout=2)"]
ENTRYPOINT ["tmem-broker"]
CMD ["serve"]
