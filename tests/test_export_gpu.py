"""GPU flavour: fp16 graphs, TensorRT build commands, configs, and the ensembles served.

TensorRT cannot be installed here, so plans are never built in these tests: the commands
and configs are checked as text (and parsed with Triton's own ModelConfig protobuf), and
the served ensembles run against a python-backend stand-in for each plan (see
tests/trt_standin/model.py), on the real tritonserver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from icl.export.onnx_export import MIN_COSINE_FP16, check_graph_contract
from icl.export.repository import (
    GpuServingSettings,
    gpu_plan_builds,
    render_gpu_configs,
    write_gpu_repository,
)
from icl.export.tensorrt import BUILD_SCRIPT, PlanBuild, find_trtexec
from icl.onnx_encoders import OnnxEncoders
from tests.helpers import start_triton

STANDIN = Path(__file__).parent / "trt_standin" / "model.py"


@pytest.fixture(scope="module")
def gpu_repository(demo_model, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("gpu_repository")
    return out, write_gpu_repository(demo_model, out)


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def test_fp16_graphs_keep_the_contract_and_pass_parity(gpu_repository):
    out, reports = gpu_repository
    assert {(r.tower, r.precision) for r in reports} == {
        (t, p) for t in ("text", "image") for p in ("fp32", "fp16")
    }
    assert all(r.min_cosine >= MIN_COSINE_FP16 for r in reports)
    for name in ("text_encoder_trt", "image_encoder_trt"):
        path = out / name / "1" / "model.onnx"
        check_graph_contract(path)  # same names and IO dtypes as the fp32 graph
        weights = onnx.load(str(path)).graph.initializer
        fp16 = sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
        assert fp16 > len(weights) // 2, "the graph must carry fp16 weights"
        assert not (out / name / "1" / "model.plan").exists()


def test_uint8_pixels_go_straight_into_a_cast(gpu_repository):
    """TensorRT accepts a uint8 network input only when it feeds a cast layer."""
    out, _ = gpu_repository
    graph = onnx.load(str(out / "image_encoder_trt/1/model.onnx")).graph
    consumers = [n.op_type for n in graph.node if "pixels" in n.input]
    assert consumers == ["Cast"]


def test_gpu_configs_parse_and_follow_the_model(demo_model):
    cfg = demo_model.config
    s = GpuServingSettings(max_batch_size=32, opt_batch_size=8, preferred_batch_sizes=(8, 16))
    configs = {name: _parse(text) for name, text in render_gpu_configs(cfg, s).items()}
    h, w = cfg.image_size
    image = configs["image_encoder_trt"]
    assert image.platform == "tensorrt_plan" and image.max_batch_size == 32
    assert image.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(image.input[0].dims) == [h, w, 3]
    assert image.input[0].data_type == mc.TYPE_UINT8
    assert list(image.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [wu.batch_size for wu in image.model_warmup] == [1, 8]
    text = configs["text_encoder_trt"]
    assert text.input[0].name == "input_ids" and text.input[0].data_type == mc.TYPE_INT64
    tok = configs["tokenizer"]
    assert tok.backend == "python" and tok.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(tok.output[0].dims) == [cfg.context_length]
    # The ensembles expose exactly the CPU flavour's contract.
    for name, inp in (("text_encoder", "TEXT"), ("image_encoder", "PIXELS")):
        ens = configs[name]
        assert ens.platform == "ensemble"
        assert [t.name for t in ens.input] == [inp]
        assert [t.name for t in ens.output] == ["EMBEDDING"]
        assert list(ens.output[0].dims) == [cfg.output_dim]
    steps = configs["text_encoder"].ensemble_scheduling.step
    assert [st.model_name for st in steps] == ["tokenizer", "text_encoder_trt"]


def test_trtexec_commands_are_strongly_typed_with_batch_profiles(demo_model):
    cfg = demo_model.config
    builds = gpu_plan_builds(cfg, GpuServingSettings(max_batch_size=64, opt_batch_size=16))
    image = next(b for b in builds if b.input_name == "pixels")
    h, w = cfg.image_size
    assert image.trtexec_args() == [
        "--onnx=image_encoder_trt/1/model.onnx",
        "--saveEngine=image_encoder_trt/1/model.plan",
        "--stronglyTyped",
        f"--minShapes=pixels:1x{h}x{w}x3",
        f"--optShapes=pixels:16x{h}x{w}x3",
        f"--maxShapes=pixels:64x{h}x{w}x3",
        "--timingCacheFile=timing.cache",
        "--skipInference",
    ]
    with pytest.raises(ValueError, match="min <= opt <= max"):
        PlanBuild("a.onnx", "a.plan", "x", (3,), 1, 65, 64)
    with pytest.raises(ValueError):
        GpuServingSettings(max_batch_size=8, opt_batch_size=16)


def test_build_script_runs_trtexec_for_every_plan(gpu_repository, tmp_path):
    """A fake trtexec (a shell script; TensorRT cannot run here) records its arguments."""
    out, _ = gpu_repository
    fake = tmp_path / "trtexec"
    log = tmp_path / "calls"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "TRTEXEC": str(fake)}
    subprocess.run(["sh", str(out / BUILD_SCRIPT)], env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all("--stronglyTyped" in c for c in calls)
    # Without any trtexec the script stops with its own message and exit code 3.
    env = {**os.environ, "PATH": "/usr/bin:/bin", "TRTEXEC": ""}
    if find_trtexec() is None:
        proc = subprocess.run(["sh", str(out / BUILD_SCRIPT)], env=env, capture_output=True)
        assert proc.returncode == 3 and b"trtexec not found" in proc.stderr


def test_build_script_commands_through_a_trtexec_on_path(gpu_repository, demo_model, tmp_path):
    """The script as the `plans` compose service runs it (`sh build_plans.sh` in the TensorRT
    image, trtexec found on PATH), with a stand-in trtexec (TensorRT cannot run here) that
    records its arguments and working directory: every plan gets its profile over the batch
    axis, the strongly typed build and the shared timing cache, paths relative to the
    repository."""
    out, _ = gpu_repository
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    (bin_dir / "trtexec").write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'cwd': os.getcwd(), 'argv': sys.argv[1:]}) + '\\n')\n"
    )
    (bin_dir / "trtexec").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("TRTEXEC", None)
    proc = subprocess.run(
        ["sh", BUILD_SCRIPT], cwd=out, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("all plans built")
    import json

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    cfg = demo_model.config
    h, w = cfg.image_size
    s = GpuServingSettings()
    want = {
        "image_encoder_trt": ("pixels", f"{h}x{w}x3"),
        "text_encoder_trt": ("input_ids", f"{cfg.context_length}"),
    }
    assert len(calls) == len(want)
    for call in calls:
        assert Path(call["cwd"]) == out.resolve()
        args = dict(a.split("=", 1) if "=" in a else (a, "") for a in call["argv"])
        model = Path(args["--onnx"]).parts[0]
        name, item = want.pop(model)
        assert args["--onnx"] == f"{model}/1/model.onnx"
        assert args["--saveEngine"] == f"{model}/1/model.plan"
        assert (out / args["--onnx"]).is_file()
        assert "--stronglyTyped" in args and "--fp16" not in args
        assert args["--minShapes"] == f"{name}:1x{item}"
        assert args["--optShapes"] == f"{name}:{s.opt_batch_size}x{item}"
        assert args["--maxShapes"] == f"{name}:{s.max_batch_size}x{item}"
        assert args["--timingCacheFile"] == "timing.cache"
    assert not want


def test_cli_without_tensorrt_explains_the_next_step(tmp_path):
    if find_trtexec() is not None:
        pytest.skip("TensorRT is installed here")
    cmd = [sys.executable, "-m", "icl.cli", "export", "--flavour", "gpu", "--out"]
    proc = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "plans not built" in proc.stdout and BUILD_SCRIPT in proc.stdout
    proc = subprocess.run(
        [*cmd, str(tmp_path / "b"), "--plans", "require"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "trtexec is not installed" in proc.stderr
    assert not (tmp_path / "b").exists()  # failed before any export work


def test_served_ensembles_match_the_cpu_flavour(gpu_repository, model_repository, tmp_path):
    """The GPU repository on the real tritonserver, each plan replaced by its stand-in."""
    out, _ = gpu_repository
    repo = shutil.copytree(out, tmp_path / "repo")
    for name in ("text_encoder_trt", "image_encoder_trt"):
        config = repo / name / "config.pbtxt"
        text = config.read_text().replace('platform: "tensorrt_plan"', 'backend: "python"')
        config.write_text(text.replace("KIND_GPU", "KIND_CPU"))
        shutil.copyfile(STANDIN, repo / name / "1" / "model.py")
    server = start_triton(repo, tmp_path / "server.log")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        texts = ["a woman in a red coat", "a man with a black backpack and blue jeans"]
        inp = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
        text_emb = client.infer("text_encoder", [inp]).as_numpy("EMBEDDING")
        cpu = OnnxEncoders.from_repository(model_repository)
        h, w = cpu.image_size
        pixels = np.random.default_rng(1).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        inp = grpcclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        image_emb = client.infer("image_encoder", [inp]).as_numpy("EMBEDDING")
        for got, ref in ((text_emb, cpu.embed_texts(texts)), (image_emb, cpu.embed_images(pixels))):
            cos = (
                np.sum(got * ref, axis=1)
                / np.linalg.norm(got, axis=1)
                / np.linalg.norm(ref, axis=1)
            )
            assert cos.min() >= MIN_COSINE_FP16
        meta = client.get_model_metadata("image_encoder", as_json=True)
        assert [int(d) for d in meta["inputs"][0]["shape"][1:]] == [h, w, 3]
    finally:
        server.stop()
