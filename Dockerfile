# streamadapt images, two targets of one Dockerfile:
#   serving  the worker (`streamadapt run --role worker`): serving never imports TensorFlow, so the image has none
#   trainer  the trainer and `streamadapt pretrain`: the same with TensorFlow (the `cpu` extra)
# Dependencies are installed from uv-resolved lock files with their hashes (scripts/lock-requirements) into a
# virtualenv, which is copied into a slim runtime that runs as a non-root user. The entrypoint is the same
# `streamadapt` command the local stack runs (scripts/demo).

FROM python:3.11.11-slim-bookworm AS build-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamadapt ./streamadapt

FROM build-base AS build-serving
COPY requirements/serving.lock ./
RUN pip install --require-hashes --no-deps -r serving.lock && pip install --no-deps .

FROM build-base AS build-trainer
COPY requirements/trainer.lock ./
RUN pip install --require-hashes --no-deps -r trainer.lock && pip install --no-deps .

FROM python:3.11.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 OPENBLAS_NUM_THREADS=1
RUN groupadd --system --gid 10001 streamadapt \
 && useradd --system --uid 10001 --gid streamadapt --home-dir /home/streamadapt --create-home streamadapt
# /models holds the source checkpoint; a new named volume mounted here inherits this owner.
RUN mkdir -p /models && chown 10001:10001 /models
WORKDIR /home/streamadapt
EXPOSE 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["streamadapt"]
CMD ["run"]

FROM runtime AS trainer
COPY --from=build-trainer /opt/venv /opt/venv
USER 10001:10001

FROM runtime AS serving
COPY --from=build-serving /opt/venv /opt/venv
USER 10001:10001
