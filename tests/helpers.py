"""Builders shared by tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icl.cli.demo import demo_enroll_item
from icl.orchestrator.tritonserver import TritonServer, free_port
from icl.synthetic.demo_gallery import DemoImage
from icl_api import pb
from icl_api.client import TlsOptions, open_channel


def gallery_images(demo: Iterable[DemoImage]) -> list[pb.GalleryImage]:
    return [demo_enroll_item(d, f"demo://{d.image_id}.png") for d in demo]


def enroll_all(stub, images: list[pb.GalleryImage], batch_size: int = 16) -> list[pb.EnrollResult]:
    def batches():
        for i in range(0, len(images), batch_size):
            yield pb.EnrollRequest(images=images[i : i + batch_size])

    return [r for response in stub.Enroll(batches(), timeout=60) for r in response.results]


# Every tritonserver a test starts; the session's end stops them and checks /dev/shm.
LAUNCHED: list[TritonServer] = []


def start_triton(repo: Path, log: Path, **kwargs) -> TritonServer:
    server = TritonServer(repo, log, **kwargs)
    LAUNCHED.append(server)
    return server.start()


@dataclass
class RunningOrchestrator:
    process: subprocess.Popen[bytes]
    address: str
    log: Path
    tls: TlsOptions | None = None  # how to reach it when it serves TLS

    def channel(self) -> grpc.Channel:
        return open_channel(self.address, self.tls)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orchestrator(
    triton_url: str,
    milvus_uri: Path,
    log: Path,
    args: Sequence[str] = (),
    tls: TlsOptions | None = None,
    **env: str,
) -> RunningOrchestrator:
    """`icl serve` (with extra `args`) in its own process; returns once its gRPC health check
    says SERVING, asked over TLS with `tls` when given."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "icl.cli",
        "serve",
        "--triton-url",
        triton_url,
        "--milvus-uri",
        str(milvus_uri),
        "--port",
        str(port),
        "-v",
        *args,
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    running = RunningOrchestrator(proc, f"127.0.0.1:{port}", log, tls)
    deadline = time.monotonic() + 90
    with running.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"icl serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return running
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                running.stop()
                raise RuntimeError(f"icl serve not healthy in time:\n{log.read_text()}")
            time.sleep(0.2)


def unit_vectors(n: int, dim: int, seed: int = 0):
    """Random L2-normalised float32 rows, like the served embeddings."""
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gallery_records(vectors, cameras: int = 10, start_ms: int = 1_767_600_000_000):
    """GalleryRecords r00000.. spread round-robin over cam-00.., one second apart."""
    from icl.ports import GalleryRecord

    return [
        GalleryRecord(
            image_id=f"r{i:05d}",
            camera_id=f"cam-{i % cameras:02d}",
            captured_at_ms=start_ms + 1000 * i,
            track_id=f"t{i // 3:05d}",
            image_uri=f"s3://crops/r{i:05d}.jpg",
            embedding=v,
        )
        for i, v in enumerate(vectors)
    ]


def start_milvus_server(data_dir: Path):
    """A real Milvus 2.3 standalone (PyPI `milvus`) on loopback; the caller stops it."""
    from icl.orchestrator.milvus_server import MilvusServer

    return MilvusServer(data_dir).start()


def proc_state(pid: int) -> str | None:
    """The state letter of pid from /proc (R, S, Z for a zombie, ...); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group pgid."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_until(condition, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll condition() until it is true or timeout_s passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def tiny_bert(out: Path, words: Iterable[str]) -> Path:
    """A randomly initialised 2-layer BERT (32-d) with a word-level vocabulary of `words`,
    saved as a transformers directory: the real text-tower code path, no weights to fetch."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *sorted(set(words))]
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(out)
    # transformers 5 takes the vocabulary file as `vocab` (4.x called it `vocab_file`).
    BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(out)
    return out
