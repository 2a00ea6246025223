"""Gallery benchmark: enrolment throughput end to end, and search latency and recall.

    python benchmarks/gallery.py --sizes 10000,100000     # writes docs/gallery.md's table

Enrolment: the demo model served by the real tritonserver (CPU), an in-process orchestrator
on Milvus Lite, and demo crops (PNG) streamed through Enroll; compared with the image
encoder alone (pre-decoded pixels straight to Triton, same batch size, 2 requests in
flight) in the same run. Search: random L2-normalised 512-d vectors (the demo model's
width), 10 cameras; Milvus Lite, the Milvus 2.3.5 server (PyPI `milvus`, loopback) and a
numpy exact baseline; single-query latency p50/p95 and recall@10 against exact search,
unfiltered and filtered to one camera (10% of rows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from icl.orchestrator.gallery import FILTERED_SEARCH_EF, HNSW, SEARCH_EF, MilvusGallery
from icl.orchestrator.milvus_server import MilvusServer
from icl.ports import GalleryFilter, GalleryRecord

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gallery.md"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
DIM = 512
CAMERAS = 10


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- enrolment, end to end
async def _enrol(n_images: int, batch: int, work: Path) -> tuple[float, float]:
    import grpc

    from icl.demo import DEMO_WEIGHTS, demo_path
    from icl.export.repository import write_repository
    from icl.images import decode_crop
    from icl.models.dual_encoder import load_checkpoint
    from icl.orchestrator.client import channel_options, enroll
    from icl.orchestrator.encoders import TritonEncoders
    from icl.orchestrator.server import Orchestrator, OrchestratorConfig
    from icl.orchestrator.tritonserver import TritonServer
    from icl.reid.v1 import person_search_pb2 as pb
    from icl.reid.v1 import person_search_pb2_grpc as pb_grpc
    from icl.synthetic.demo_gallery import demo_gallery, to_gallery_image

    items = [to_gallery_image(d) for d in demo_gallery(n_images, seed=3)]
    write_repository(load_checkpoint(demo_path(DEMO_WEIGHTS)), work / "repo")
    with TritonServer(work / "repo", work / "triton.log") as triton:
        enc = TritonEncoders(triton.grpc_url)
        await enc.start()
        pixels = np.stack([decode_crop(i.image, enc.image_size) for i in items])
        await enc.encode_images(pixels[:batch])  # warm up
        t = time.perf_counter()
        sem = asyncio.Semaphore(2)

        async def one(chunk: np.ndarray) -> None:
            async with sem:
                await enc.encode_images(chunk)

        await asyncio.gather(*(one(pixels[i : i + batch]) for i in range(0, n_images, batch)))
        encoder_rate = n_images / (time.perf_counter() - t)
        await enc.close()
        orch = Orchestrator(OrchestratorConfig(triton.grpc_url, str(work / "enrol.db")))
        await orch.start()
        try:
            async with grpc.aio.insecure_channel(orch.address, options=channel_options()) as ch:
                stub = pb_grpc.PersonSearchStub(ch)
                t = time.perf_counter()
                accepted = 0
                async for r in enroll(stub, items, batch):
                    accepted += sum(x.status == pb.EnrollResult.ACCEPTED for x in r.results)
                e2e_rate = n_images / (time.perf_counter() - t)
                assert accepted == n_images
        finally:
            await orch.stop()
    return encoder_rate, e2e_rate


# ---------------------------------------------------------------- search
def _records(vectors: np.ndarray) -> list[GalleryRecord]:
    return [
        GalleryRecord(f"r{i:07d}", f"cam-{i % CAMERAS:02d}", 1_767_600_000_000 + i, "", "", v)
        for i, v in enumerate(vectors)
    ]


def _fill(gallery: MilvusGallery, vectors: np.ndarray, chunk: int = 5000) -> float:
    t = time.perf_counter()
    for s in range(0, len(vectors), chunk):
        gallery.upsert(_records(vectors[s : s + chunk]))
    if not gallery.local:  # seal segments and wait for their HNSW index
        c = gallery._client
        c.flush(gallery.collection)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            info = c.describe_index(gallery.collection, "embedding")
            if int(info.get("pending_index_rows", 0)) == 0 and int(
                info.get("indexed_rows", 0)
            ) >= len(vectors):
                break
            time.sleep(1)
        c.release_collection(gallery.collection)
        c.load_collection(gallery.collection)
    return len(vectors) / (time.perf_counter() - t)


def _measure(search, vectors: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    cams = np.arange(len(vectors)) % CAMERAS
    out: dict[str, float] = {}
    for name, where, keep in [
        ("all", GalleryFilter(), None),
        ("cam", GalleryFilter(("cam-03",)), cams == 3),
    ]:
        times, recall = [], []
        for q in queries:
            scores = vectors @ q
            if keep is not None:
                scores = np.where(keep, scores, -np.inf)
            want = set(np.argpartition(-scores, 10)[:10].tolist())
            t = time.perf_counter()
            got = search(q, where)
            times.append(time.perf_counter() - t)
            recall.append(len(want & set(got)) / 10)
        out[f"{name}_p50"] = float(np.percentile(times, 50) * 1000)
        out[f"{name}_p95"] = float(np.percentile(times, 95) * 1000)
        out[f"{name}_recall"] = float(np.mean(recall))
    return out


def _milvus_search(gallery: MilvusGallery):
    def search(q: np.ndarray, where: GalleryFilter) -> list[int]:
        return [int(h.image_id[1:]) for h in gallery.search(q, 10, where)]

    return search


def _numpy_search(vectors: np.ndarray):
    cams = np.arange(len(vectors)) % CAMERAS

    def search(q: np.ndarray, where: GalleryFilter) -> list[int]:
        scores = vectors @ q
        if where.camera_ids:
            scores = np.where(cams == int(where.camera_ids[0][-2:]), scores, -np.inf)
        return np.argpartition(-scores, 10)[:10].tolist()

    return search


def _search_rows(sizes: list[int], backends: list[str], n_queries: int, work: Path) -> list:
    rows = []
    server = MilvusServer(work / "milvus-server").start() if "server" in backends else None
    try:
        for size in sizes:
            vectors, queries = unit(size, 1), unit(n_queries, 2)
            for backend in backends:
                insert_rate = float("nan")
                if backend == "numpy":
                    search = _numpy_search(vectors)
                else:
                    uri = server.uri if backend == "server" else str(work / f"lite{size}.db")
                    gallery = MilvusGallery(uri, DIM, f"bench_{size}")
                    insert_rate = _fill(gallery, vectors)
                    search = _milvus_search(gallery)
                m = _measure(search, vectors, queries)
                if backend != "numpy":
                    gallery.close()
                rows.append((size, backend, insert_rate, m))
                print(size, backend, f"{insert_rate:.0f} rows/s", m, flush=True)
    finally:
        if server is not None:
            server.stop()
    return rows


def _machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="gallery sizes, comma separated")
    ap.add_argument("--backends", default="lite,server,numpy")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--enrol-images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    backends = [b for b in args.backends.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        enc_rate, e2e_rate = asyncio.run(_enrol(args.enrol_images, args.batch, work))
        print(f"encoder {enc_rate:.1f} img/s, enrol end to end {e2e_rate:.1f} img/s", flush=True)
        rows = _search_rows(sizes, backends, args.queries, work)
    lines = [
        f"Machine: {_machine()}. HNSW M {HNSW['M']}, efConstruction {HNSW['efConstruction']}, "
        f"ef {SEARCH_EF} (unfiltered) / {FILTERED_SEARCH_EF} (filtered), IP, {DIM}-d.",
        "",
        f"Enrolment ({args.enrol_images} demo crops, batches of {args.batch}, Milvus Lite): "
        f"image encoder alone {enc_rate:.1f} img/s; Enroll end to end {e2e_rate:.1f} img/s "
        f"= {100 * e2e_rate / enc_rate:.0f}% of the encoder.",
        "",
        f"Search ({args.queries} single queries, top 10; `cam` = one camera of {CAMERAS}, "
        "10% of rows):",
        "",
        "| rows | backend | insert rows/s | p50 ms | p95 ms | recall@10 | cam p50 ms "
        "| cam p95 ms | cam recall@10 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, backend, rate, m in rows:
        ins = "-" if np.isnan(rate) else f"{rate:.0f}"
        lines.append(
            f"| {size:,} | {backend} | {ins} | {m['all_p50']:.2f} | {m['all_p95']:.2f} "
            f"| {m['all_recall']:.3f} | {m['cam_p50']:.2f} | {m['cam_p95']:.2f} "
            f"| {m['cam_recall']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write and DOC.exists():
        text = DOC.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        DOC.write_text(re.sub(f"{re.escape(BEGIN)}.*?{re.escape(END)}", block, text, flags=re.S))


if __name__ == "__main__":
    main()
