# The templar code location image: the Dagster code server (`dagster api grpc`, the default command), and the image
# every run and step pod of templar runs (deploy/k8s, deploy/helm). CUDA comes with the torch wheel; the node
# needs only the NVIDIA driver and device plugin.
#   docker build -t ghcr.io/templar-dagster/templar-dagster:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    TEMPLAR_HOME=/var/lib/templar

WORKDIR /opt/templar

# The pinned dependencies first, read from pyproject.toml (exact pins: every node computes the same bits), in a
# layer of their own: a change to the code does not reinstall torch.
COPY pyproject.toml ./
RUN python -c "import tomllib as toml; print(*toml.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
    > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY templar_lib ./templar_lib
COPY templar_pipelines ./templar_pipelines
RUN pip install --no-deps . && rm -rf build

# A user of its own (the uid deploy/k8s and deploy/helm run pods as), owning DAGSTER_HOME and the state directory.
RUN groupadd --gid 10001 templar \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/templar --shell /usr/sbin/nologin templar \
    && mkdir -p "$DAGSTER_HOME" "$TEMPLAR_HOME" \
    && chown templar:templar "$DAGSTER_HOME" "$TEMPLAR_HOME"
USER 10001:10001

EXPOSE 3030
CMD ["dagster", "api", "grpc", "--host", "0.0.0.0", "--port", "3030", "--module-name", "templar_pipelines"]
