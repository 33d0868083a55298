# Amplitude -> PostHog connector.
#
#   docker build -t amplitude-posthog-connector .
#   docker run -d --name connector -v connector-data:/data --env-file .env \
#     -p 8000:8000 amplitude-posthog-connector
#
# State (SQLite) lives in the /data volume; /healthz and /metrics are served on
# $HEALTH_PORT. The process runs as PID 1 and handles SIGTERM itself.

# ---- builder: a venv with the dependencies, then the package ----------------
FROM docker.io/library/python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so this layer stays cached
# while only the source changes. The build backend goes to a separate venv
# that never reaches the final image.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
open('/tmp/requirements.txt', 'w').write('\n'.join(p['project']['dependencies']) + '\n'); \
open('/tmp/build-requirements.txt', 'w').write('\n'.join(p['build-system']['requires'] + ['wheel']) + '\n')" \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install -r /tmp/build-requirements.txt

# Then the source. connector/plugin.json is a symlink to ../plugin.json, so
# the real file is copied next to the package and the wheel gets its content.
COPY plugin.json README.m[d] ./
COPY connector/ ./connector/
# pycountry's locales (22 MB of translations) go: the connector reads English names only.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /tmp/dist . \
 && /opt/venv/bin/pip install --no-deps /tmp/dist/*.whl \
 && /opt/venv/bin/python -c "import json, pathlib, sysconfig; \
p = pathlib.Path(sysconfig.get_paths()['purelib'], 'connector', 'plugin.json'); \
assert p.is_file() and not p.is_symlink(), p; json.loads(p.read_text())" \
 && /opt/venv/bin/pip uninstall -y pip setuptools \
 && rm -rf /opt/venv/lib/python3.11/site-packages/pycountry/locales \
 && rm -rf /tmp/dist /root/.cache

# ---- runtime ------------------------------------------------------------------
FROM docker.io/library/python:3.11-slim-bookworm

# Keep in step with pyproject.toml (tests/container checks it), or pass
# --build-arg VERSION=...
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="amplitude-posthog-connector" \
      org.opencontainers.image.description="Continuous Amplitude Export API to self-hosted PostHog sync" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/amplitude-posthog/connector" \
      org.opencontainers.image.url="https://github.com/amplitude-posthog/connector" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PIP_NO_CACHE_DIR=1 \
    HEALTH_PORT=8000 \
    HEALTH_HOST=0.0.0.0

RUN groupadd --gid 10001 connector \
 && useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin connector \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0750 /data

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

STOPSIGNAL SIGTERM
# Stdlib only (no curl in slim images). An empty HEALTH_PORT turns the
# endpoint off, and with it the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; p = os.environ.get('HEALTH_PORT'); p and urllib.request.urlopen('http://127.0.0.1:%s/healthz' % p, timeout=3)"]

# Exec form: python is PID 1 and receives SIGTERM directly.
ENTRYPOINT ["python", "-m", "connector"]
CMD ["run"]
