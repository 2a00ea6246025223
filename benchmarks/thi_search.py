"""Search latency with THI off and on (lean and reference) through the running stack.

    python benchmarks/thi_search.py            # writes docs/benchmarks/thi_search.md

One tritonserver hosts the demo encoders and the demo MLLM; for each setting an orchestrator
(in this process, Milvus Lite in a temp dir) enrols the same demo gallery and answers the
same queries one after another over gRPC. Reported: p50/p95 latency and MLLM evaluations and
round trips per query (from the THI trace), all in one run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from icl.cli.demo import demo_enroll_item
from icl.demo import DEMO_WEIGHTS, demo_path
from icl.export.mllm_repository import write_mllm_model
from icl.export.repository import write_repository
from icl.models.dual_encoder import load_checkpoint
from icl.orchestrator.server import Orchestrator, OrchestratorConfig
from icl.orchestrator.tritonserver import TritonServer
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl.thi.engine import is_failure
from icl_api import pb_grpc
from icl_api.client import channel_options, enroll, search_request

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (
    ("THI off", "lean", "lazy", False),
    ("THI lean, lazy walk (default)", "lean", "lazy", True),
    ("THI lean, batched check", "lean", "batched", True),
    ("THI reference (paper's schedule)", "reference", "lazy", True),
)


async def run_setting(
    triton_url: str, work: Path, schedule: str, walk: str, thi: bool, images: int, queries: list
) -> dict:
    config = OrchestratorConfig(
        triton_url=triton_url,
        milvus_uri=str(work / "gallery.db"),
        thi_schedule=schedule,
        thi_walk=walk,
        mllm_model="mllm",
    )
    orchestrator = Orchestrator(config)
    await orchestrator.start()
    try:
        async with grpc.aio.insecure_channel(
            orchestrator.address, options=channel_options()
        ) as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            async for _ in enroll(stub, (demo_enroll_item(d) for d in demo_gallery(images))):
                pass
            latencies, evaluations = [], []
            for i, text in enumerate([*queries[:5], *queries]):  # 5 warm-up searches
                request = search_request(text, top_k=10)
                request.thi.enabled = thi
                start = time.perf_counter()
                reply = await stub.Search(request, timeout=60)
                elapsed = time.perf_counter() - start
                if i < 5:
                    continue
                latencies.append(elapsed * 1000)
                if thi:
                    trace = reply.thi_trace
                    if is_failure(trace.fallback_reason):
                        raise RuntimeError(f"THI fell back: {trace.fallback_reason}")
                    evaluations.append(trace.mllm_calls)
    finally:
        await orchestrator.stop()
    return {
        "p50": float(np.percentile(latencies, 50)),
        "p95": float(np.percentile(latencies, 95)),
        "evaluations": float(np.mean(evaluations)) if evaluations else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/thi_search.md")
    args = parser.parse_args()
    queries = demo_queries(seed=0, count=args.queries)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(load_checkpoint(demo_path(DEMO_WEIGHTS)), repo)
        write_mllm_model(repo, "demo", None)
        server = TritonServer(repo, Path(tmp) / "triton.log")
        server.start()
        try:
            for i, (name, schedule, walk, thi) in enumerate(SETTINGS):
                result = asyncio.run(
                    run_setting(
                        server.grpc_url,
                        Path(tmp) / f"s{i}",
                        schedule,
                        walk,
                        thi,
                        args.images,
                        queries,
                    )
                )
                rows.append((name, result))
        finally:
            server.stop()
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores; demo encoders + demo MLLM on tritonserver "
        f"(CPU, python backend); Milvus Lite; {args.images} enrolled images, {args.queries} "
        "queries one at a time, top_k 10, THI K 5, xi 0.5, lambda 0.8.",
        "",
        "| setting | p50 ms | p95 ms | MLLM evaluations per query |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['p50']:.1f} | {r['p95']:.1f} | {r['evaluations']:.2f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Search latency with THI off and on\n\n"
        "Written by `python benchmarks/thi_search.py`; rerun to refresh.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
