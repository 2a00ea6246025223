# Triton for the encoders (GPU flavour): NVIDIA's Triton image with the exported repository
# (`icl export --flavour gpu`: TensorRT plans behind ensembles; the `tokenizer` step is a
# python-backend model that imports icl.text). The plans themselves are built on the serving
# GPU by the `plans` service of compose.yaml (TensorRT image of the same release) into the
# mounted repository: a plan is tied to the TensorRT version and the GPU.
# Build from the repository root:
#   docker build -f docker/triton.Dockerfile --build-arg NGC_RELEASE=26.06 -t icl-triton .
ARG NGC_RELEASE=26.06
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3

# The python-backend models run on the image's Python (3.12): only icl's code and the three
# libraries they import are installed, without the package's 3.11 venv pins.
COPY icl /opt/icl-src/icl
COPY api /opt/icl-src/api
COPY cli /opt/icl-src/cli
COPY orchestrator /opt/icl-src/orchestrator
COPY export /opt/icl-src/export
COPY model_repository /opt/icl-src/model_repository
COPY pyproject.toml README.md /opt/icl-src/
RUN pip install --no-cache-dir --no-deps --ignore-requires-python /opt/icl-src \
    && pip install --no-cache-dir numpy==1.26.4 tokenizers==0.23.3 pillow==13.0.0

# Triton runs as the image's unprivileged user, triton-server (uid 1000).
USER 1000:1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true"]
