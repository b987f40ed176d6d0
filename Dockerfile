# streamadapt worker and trainer image. Multi-stage: dependencies are built into a virtualenv in the
# first stage and copied into a slim runtime that runs as a non-root user.
# The entrypoint is the same `streamadapt` command the local stack runs (scripts/demo).

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY streamadapt ./streamadapt
RUN pip install --no-deps .

FROM python:3.11.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 OPENBLAS_NUM_THREADS=1
RUN groupadd --system --gid 10001 streamadapt \
 && useradd --system --uid 10001 --gid streamadapt --home-dir /home/streamadapt --create-home streamadapt
COPY --from=build /opt/venv /opt/venv
# /models holds the source checkpoint; a new named volume mounted here inherits this owner.
RUN mkdir -p /models && chown 10001:10001 /models
USER 10001:10001
WORKDIR /home/streamadapt
EXPOSE 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["streamadapt"]
CMD ["run"]
