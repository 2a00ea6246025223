# The PersonSearch gRPC service (`icl serve`) and, in the `cpu` profile, the bundled CPU
# tritonserver (`icl triton`: nvidia-pytriton's binary, python backend + onnxruntime).
# Build from the repository root:  docker build -f docker/service.Dockerfile -t icl-service .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A non-root user owns nothing but its home and the state volume.
RUN groupadd --system --gid 10001 icl \
    && useradd --system --uid 10001 --gid icl --home-dir /home/icl --create-home icl

WORKDIR /opt/icl
COPY pyproject.toml README.md ./
COPY icl ./icl
COPY api ./api
COPY cli ./cli
COPY orchestrator ./orchestrator
COPY export ./export
COPY model_repository ./model_repository
# Every dependency is pinned in pyproject.toml; torch comes from PyTorch's CPU index (the
# service and the CPU Triton never use CUDA, and PyPI's torch would pull CUDA wheels).
# The python backend stub is copied into the installed tritonserver's backends/ on first use;
# do it here, as root, since the runtime user cannot write site-packages.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "./[serve]" \
    && python -c "from icl.orchestrator.tritonserver import ensure_python_backend as e; e()" \
    && mkdir -p /var/lib/icl && chown icl:icl /var/lib/icl

USER 10001:10001
WORKDIR /home/icl
VOLUME ["/var/lib/icl"]
EXPOSE 50051 9464
# Settings come from ICL_* environment variables (compose.yaml, env files); the gRPC health
# service is the health check (grpc_health_probe-free: the package's own client).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import grpc, os; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ.get('ICL_PORT', '50051'))).Check(h.HealthCheckRequest(), timeout=3); raise SystemExit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["icl"]
CMD ["serve", "--host", "0.0.0.0"]
