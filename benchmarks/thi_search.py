"""Search latency with THI off and on (lean and reference) through the running stack.

    python benchmarks/thi_search.py            # writes docs/benchmarks/thi_search.md

For each setting a fresh tritonserver hosts the demo encoders and the demo MLLM and a fresh
orchestrator (in this process, Milvus Lite in a temp dir) enrols the same demo gallery and
answers the same queries one after another over gRPC, twice: the first pass is cold (the
MLLM has seen no crop, the gallery holds no VQA answers), the second warm (the same queries
again: what a service that has been answering for a while sees for repeated candidates).
Reported: p50/p95 latency of each pass and MLLM evaluations per query (from the THI trace),
all in one run on one machine.
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
WARM_UP = ("a person", "a man in a jacket", "a woman with a bag", "someone walking", "a child")
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
            for text in WARM_UP:  # the connections and the encoders, not the MLLM's caches
                await stub.Search(search_request(text, top_k=10), timeout=60)
            passes = []
            for _ in ("cold", "warm"):
                latencies, evaluations = [], []
                for text in queries:
                    request = search_request(text, top_k=10)
                    request.thi.enabled = thi
                    start = time.perf_counter()
                    reply = await stub.Search(request, timeout=60)
                    latencies.append((time.perf_counter() - start) * 1000)
                    if thi:
                        trace = reply.thi_trace
                        if is_failure(trace.fallback_reason):
                            raise RuntimeError(f"THI fell back: {trace.fallback_reason}")
                        evaluations.append(trace.mllm_calls)
                passes.append(
                    {
                        "p50": float(np.percentile(latencies, 50)),
                        "p95": float(np.percentile(latencies, 95)),
                        "evaluations": float(np.mean(evaluations)) if evaluations else 0.0,
                    }
                )
    finally:
        await orchestrator.stop()
    return {"cold": passes[0], "warm": passes[1]}


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
        for i, (name, schedule, walk, thi) in enumerate(SETTINGS):
            server = TritonServer(repo, Path(tmp) / f"triton{i}.log")  # fresh MLLM caches
            server.start()
            try:
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
            finally:
                server.stop()
            rows.append((name, result))
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores; demo encoders + demo MLLM on tritonserver "
        f"(CPU, python backend); Milvus Lite; {args.images} enrolled images, {args.queries} "
        "queries one at a time, each pass twice (cold, then warm), top_k 10, THI K 5, xi 0.5, "
        "lambda 0.8.",
        "",
        "| setting | cold p50 ms | cold p95 ms | warm p50 ms | warm p95 ms "
        "| MLLM evaluations per query (cold / warm) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        c, w = r["cold"], r["warm"]
        lines.append(
            f"| {name} | {c['p50']:.1f} | {c['p95']:.1f} | {w['p50']:.1f} | {w['p95']:.1f} "
            f"| {c['evaluations']:.2f} / {w['evaluations']:.2f} |"
        )
    base = rows[0][1]
    for name, r in rows[1:2]:
        lines += [
            "",
            f"{name}: p50 {r['cold']['p50'] / base['cold']['p50']:.1f}x THI off's cold and "
            f"{r['warm']['p50'] / base['warm']['p50']:.1f}x warm (same run).",
        ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Search latency with THI off and on\n\n"
        "Written by `python benchmarks/thi_search.py`; rerun to refresh.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
