# One image for both planes of mpnn:
#   the operator            docker run IMAGE operator [--namespace NS ...]
#   a partition server      docker run IMAGE serve    (what the operator's StatefulSets run)
# Build from the repository root:  docker build -t ghcr.io/mpnn/mpnn:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY partition_server/ partition_server/
COPY operator/ operator/
# The project with both planes (the operator extra), no dev extras, in a venv copied below.
RUN python -m venv /opt/mpnn && /opt/mpnn/bin/pip install ".[operator]" && /opt/mpnn/bin/mpnn --help >/dev/null

FROM ${PYTHON_IMAGE}
# uid/gid 65532: what the operator's pods run as (runAsUser), numeric so the kubelet can check runAsNonRoot.
RUN groupadd --system --gid 65532 mpnn \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/mpnn --create-home --shell /usr/sbin/nologin mpnn
COPY --from=build /opt/mpnn /opt/mpnn
ENV PATH=/opt/mpnn/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
WORKDIR /home/mpnn
ENTRYPOINT ["mpnn"]
CMD ["--help"]
