# The operator console (Streamlit, ui/): talks to the service over gRPC only (icl_api).
# Build from the repository root:  docker build -f docker/console.Dockerfile -t icl-console .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

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
COPY ui ./ui
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "./[ui]"

USER 10001:10001
WORKDIR /opt/icl/ui
EXPOSE 8501
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=3)"]
# ICL_ADDRESS (the service, e.g. service:50051) and ICL_TOKEN come from the environment.
ENTRYPOINT ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
