# The router as a container image:
#   docker build -t router:0.1.0 .
#   docker run --rm -p 8001:8001 router:0.1.0            # demo mode: two built-in fake engines
#   docker run --rm -p 8001:8001 router:0.1.0 --static-backends http://10.0.0.7:8000 \
#       --static-models llama-3-8b
# Kubernetes manifests using it: docs/deploy/kubernetes/.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build reads, so a change to tests or docs reuses this layer.
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY router ./router
# Every runtime extra, so that whatever a chart value switches on (otel.endpoint: tracing)
# is in the image instead of making the router exit at start.
RUN pip install '.[otel]' \
    && rm -rf /src \
    && groupadd --system --gid 10001 router \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin router

WORKDIR /
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8001
ENTRYPOINT ["router"]
CMD ["--demo"]
