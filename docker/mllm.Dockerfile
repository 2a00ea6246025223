# Triton for the MLLM (GPU): NVIDIA's vLLM Triton image serving `mllm_vllm` (Qwen2-VL on the
# vLLM backend) and, in front of it, the `mllm` python-backend model with the adapter backend
# (icl.mllm.vllm_adapter, BLS to `mllm_vllm`). Repository: `icl export --mllm vllm
# --mllm-out ...`; weights: the Qwen2-VL directory mounted at /models.
# Build from the repository root:
#   docker build -f docker/mllm.Dockerfile --build-arg NGC_RELEASE=26.06 -t icl-mllm .
ARG NGC_RELEASE=26.06
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-vllm-python-py3

# The adapter needs icl's code and the tokenizer side of transformers, which the vLLM image
# already carries (with torch, numpy, pillow); nothing else is installed.
COPY icl /opt/icl-src/icl
COPY api /opt/icl-src/api
COPY cli /opt/icl-src/cli
COPY orchestrator /opt/icl-src/orchestrator
COPY export /opt/icl-src/export
COPY model_repository /opt/icl-src/model_repository
COPY pyproject.toml README.md /opt/icl-src/
RUN pip install --no-cache-dir --no-deps --ignore-requires-python /opt/icl-src

USER 1000:1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/mllm_repository", "--model-control-mode=none", "--strict-readiness=true"]
