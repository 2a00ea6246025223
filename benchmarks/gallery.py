"""Gallery benchmark: enrolment throughput end to end, and search latency and recall.

    python benchmarks/gallery.py --sizes 10000,100000,1000000  # writes docs/gallery.md's table

Enrolment: the demo encoder (and the paper's ViT-B/16 size) served by the real tritonserver
(CPU), an in-process orchestrator on Milvus Lite or the server, and demo crops (PNG) streamed
through Enroll; compared with the image encoder alone (pre-decoded pixels straight to Triton,
same batch size, 2 requests in flight) in alternating rounds of the same run. Search: the
demo model's embeddings of synthetic crops, queried with its embeddings of captions (built
once into --cache; `--data random` for random unit vectors), 10 cameras; Milvus Lite, the
Milvus 2.3.5 server (PyPI `milvus`, loopback) and a numpy exact baseline; single-query
latency p50/p95 and recall@10 against exact search, unfiltered and filtered to one camera
(10% of rows), at the service's ef and over an ef sweep.
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


# ---------------------------------------------------------------- demo-model vectors
# Gallery rows are the demo image encoder's embeddings of synthetic crops and queries its
# text encoder's embeddings of captions of identities in the gallery: the clusters (several
# views per identity, shared attributes) and the text-image modality gap that HNSW meets in
# service. Random unit vectors have neither and are the worst case for any graph index.
CHUNK = 10_000  # rows per cached file; a gallery of N rows is the first N / CHUNK files
PER_PERSON = 4  # images per identity, as in the benchmark datasets
_model = None


def _worker_init() -> None:
    import torch

    from icl.demo import DEMO_WEIGHTS, demo_path
    from icl.models.dual_encoder import load_checkpoint

    global _model
    torch.set_num_threads(1)  # one process per core
    _model = load_checkpoint(demo_path(DEMO_WEIGHTS)).eval()


def row_id(row: int) -> str:
    """The image id of gallery row `row` (as `_records` names it)."""
    return f"r{row:07d}"


def _image_chunk(index: int, crop_dir: str | None = None) -> np.ndarray:
    """Embeddings of rows index*CHUNK .. +CHUNK: identity i // PER_PERSON, one render each.

    With `crop_dir`, each row's PNG also goes into a crop store there under its row id
    (benchmarks/performance.py: THI shows the stored crops to the MLLM)."""
    from icl.evaluation import embed_images
    from icl.images import decode_crop, encode_png
    from icl.orchestrator.crops import CropStore
    from icl.synthetic.render import render
    from icl.synthetic.schema import sample_person

    size = tuple(_model.config.image_size)
    pixels = np.empty((CHUNK, *size, 3), np.uint8)
    pngs = []
    for k in range(CHUNK):
        row = index * CHUNK + k
        pid = row // PER_PERSON
        person = sample_person(np.random.default_rng([0, pid]), pid)
        crop = render(person, np.random.default_rng([1, row]))
        png = encode_png(crop)
        pixels[k] = decode_crop(png, size)  # exactly what Enroll feeds Triton
        if crop_dir is not None:
            pngs.append((row_id(row), png))
    if crop_dir is not None:
        CropStore(Path(crop_dir)).put_many(pngs)
    return embed_images(_model, pixels)


def _query_chunk(pids: list[int]) -> np.ndarray:
    from icl.evaluation import embed_texts
    from icl.models.pretrained import tokenizer_for
    from icl.synthetic.captions import caption
    from icl.synthetic.schema import sample_person

    texts = [
        caption(sample_person(np.random.default_rng([0, p]), p), np.random.default_rng([2, p]))
        for p in pids
    ]
    return embed_texts(_model, tokenizer_for(_model.config)(texts))


def model_vectors(rows: int, queries: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """`rows` gallery vectors and `queries` query vectors, built once into `cache`."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    cache.mkdir(parents=True, exist_ok=True)
    files = [cache / f"images-{i:04d}.npy" for i in range(-(-rows // CHUNK))]
    qfile = cache / f"queries-{rows}-{queries}.npy"
    missing = [i for i, f in enumerate(files) if not f.exists()]
    if missing or not qfile.exists():
        t = time.perf_counter()
        ctx = get_context("spawn")
        with ProcessPoolExecutor(os.cpu_count(), ctx, initializer=_worker_init) as pool:
            for i, vecs in zip(missing, pool.map(_image_chunk, missing), strict=True):
                np.save(files[i], vecs.astype(np.float32))
                print(f"vectors: chunk {i + 1}/{len(files)} {time.perf_counter() - t:.0f} s")
            # Queries describe identities whose images are in the gallery (spread over it).
            pids = np.random.default_rng(rows).choice(rows // PER_PERSON, queries, False)
            np.save(qfile, pool.submit(_query_chunk, pids.tolist()).result())
    gallery = np.concatenate([np.load(f) for f in files])[:rows]
    return gallery, np.load(qfile)


# ---------------------------------------------------------------- enrolment, end to end
def _cpu_s(pid: int, children: bool = True) -> float:
    """User + system CPU seconds a process (and its live descendants) has used so far."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu s)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        stats[int(stat.parent.name)] = (int(fields[1]), cpu)
    tree, total = {pid}, 0.0
    for p in sorted(stats):  # children have larger pids than their parents, mostly
        if p in tree or (children and stats[p][0] in tree):
            tree.add(p)
            total += stats[p][1]
    return total


class _Cpu:
    """CPU ms per image of named processes over one timed phase (reads /proc)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: self._cpu(name) for name in pids}

    def _cpu(self, name: str) -> float:
        # This process starts tritonserver: count its own threads only, not its children.
        return _cpu_s(self.pids[name], children=name != "python")

    def per_image(self, n: int) -> dict[str, float]:
        return {k: 1000 * (self._cpu(k) - self.start[k]) / n for k in self.pids}


def _repository(model_name: str, work: Path) -> Path:
    """The CPU Triton repository of `model_name`: `demo` as `icl demo` exports it (1 instance
    x 1 thread), `vit-b16` the paper's ViT-B/16 at 384x128 (random weights: only the speed
    matters here) with the documented CPU setting, 2 instances x 1 thread."""
    from icl.demo import DEMO_WEIGHTS, demo_path
    from icl.export.repository import CpuServingSettings, write_repository
    from icl.models.config import vit_b16_config
    from icl.models.dual_encoder import build_model, load_checkpoint

    repo = work / f"repo-{model_name}"
    if not repo.exists():
        if model_name == "demo":
            write_repository(load_checkpoint(demo_path(DEMO_WEIGHTS)), repo)
        else:
            settings = CpuServingSettings(instances=2, intra_op_threads=1)
            write_repository(build_model(vit_b16_config()).eval(), repo, settings)
    return repo


async def _enrol(
    model_name: str,
    n_images: int,
    batch: int,
    work: Path,
    milvus_uri: str = "",
    milvus_pid: int = 0,
    rounds: int = 3,
) -> dict[str, object]:
    """Encoder alone vs Enroll end to end; `milvus_uri` "" = Milvus Lite in this process."""
    import grpc

    from icl.cli.demo import demo_enroll_item
    from icl.images import decode_crop
    from icl.orchestrator.server import Orchestrator, OrchestratorConfig
    from icl.orchestrator.triton.encoders import TritonEncoders
    from icl.orchestrator.tritonserver import TritonServer
    from icl.synthetic.demo_gallery import demo_gallery
    from icl_api import pb, pb_grpc
    from icl_api.client import channel_options, enroll

    items = [demo_enroll_item(d) for d in demo_gallery(n_images, seed=3)]
    repo = _repository(model_name, work)
    collection = f"enrol_{time.monotonic_ns()}"
    with TritonServer(repo, work / "triton.log") as triton:
        assert triton.process is not None
        pids = {"triton": triton.process.pid, "python": os.getpid()}
        if milvus_pid:
            pids["milvus"] = milvus_pid
        enc = TritonEncoders(triton.grpc_url)
        await enc.start()
        pixels = np.stack([decode_crop(i.image, enc.image_size) for i in items])
        await enc.encode_images(pixels[:batch])  # warm up
        sem = asyncio.Semaphore(2)

        async def one(chunk: np.ndarray) -> None:
            async with sem:
                await enc.encode_images(chunk)

        uri = milvus_uri or str(work / f"{collection}.db")
        config = OrchestratorConfig(
            triton.grpc_url, uri, collection=collection, crop_dir=str(work / collection)
        )
        orch = Orchestrator(config)
        await orch.start()
        # Rounds alternate encoder alone and Enroll (new ids each round): the machine is
        # shared, and the medians of alternating rounds see the same neighbours' load.
        runs: list[tuple[float, float, dict[str, float], dict[str, float]]] = []
        try:
            async with grpc.aio.insecure_channel(orch.address, options=channel_options()) as ch:
                stub = pb_grpc.PersonSearchStub(ch)
                for r in range(rounds):
                    cpu, t = _Cpu(pids), time.perf_counter()
                    await asyncio.gather(
                        *(one(pixels[i : i + batch]) for i in range(0, n_images, batch))
                    )
                    encoder_rate = n_images / (time.perf_counter() - t)
                    encoder_cpu = cpu.per_image(n_images)
                    fresh = []
                    for item in items:
                        copy = pb.GalleryImage()
                        copy.CopyFrom(item)
                        copy.image_id = f"round{r}/{item.image_id}"
                        fresh.append(copy)
                    cpu, t = _Cpu(pids), time.perf_counter()
                    accepted = 0
                    async for resp in enroll(stub, fresh, batch):
                        accepted += sum(x.status == pb.EnrollResult.ACCEPTED for x in resp.results)
                    e2e_rate = n_images / (time.perf_counter() - t)
                    assert accepted == n_images
                    runs.append((encoder_rate, e2e_rate, encoder_cpu, cpu.per_image(n_images)))
        finally:
            await orch.stop()
        await enc.close()
    runs.sort(key=lambda run: run[1] / run[0])
    encoder_rate, e2e_rate, encoder_cpu, e2e_cpu = runs[len(runs) // 2]  # the median ratio
    return {
        "model": model_name,
        "images": n_images,
        "backend": "server" if milvus_uri else "lite",
        "encoder": encoder_rate,
        "e2e": e2e_rate,
        "encoder_cpu": encoder_cpu,
        "e2e_cpu": e2e_cpu,
        "ratios": [run[1] / run[0] for run in runs],
    }


# ---------------------------------------------------------------- search
def _records(vectors: np.ndarray, first: int) -> list[GalleryRecord]:
    """Rows r{first:07d}.. (ids continue across chunks, or later chunks would replace rows)."""
    return [
        GalleryRecord(row_id(i), f"cam-{i % CAMERAS:02d}", 1_767_600_000_000 + i, "", "", v)
        for i, v in enumerate(vectors, start=first)
    ]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _lite_settle(gallery: MilvusGallery) -> None:
    """Wait for Milvus Lite's background compaction and HNSW builds (benchmark only).

    Lite's describe_index always says Finished with every row indexed, so the only way to
    know is to ask the in-process engine (a private call: fine in a benchmark, not in
    the service).
    """
    from milvus_lite.server_manager import server_manager_instance

    for _, db, _ in list(server_manager_instance._servers.values()):
        if gallery.collection in db.list_collections():
            db.get_collection(gallery.collection)._wait_for_bg()


def _fill(gallery: MilvusGallery, vectors: np.ndarray, chunk: int = 5000) -> float:
    """Rows/s until every row is searchable through its HNSW index."""
    t = time.perf_counter()
    for s in range(0, len(vectors), chunk):
        gallery.upsert(_records(vectors[s : s + chunk], s))
    if gallery.local:
        gallery.count()  # flushes the last rows, like the first search would
        _lite_settle(gallery)
    else:  # seal segments and wait for their HNSW index
        c = gallery._client
        c.flush(gallery.collection)
        deadline, shown = time.monotonic() + 3600, time.monotonic()
        while time.monotonic() < deadline:
            info = c.describe_index(gallery.collection, "embedding")
            indexed = int(info.get("indexed_rows", 0))
            if int(info.get("pending_index_rows", 0)) == 0 and indexed >= len(vectors):
                break
            if time.monotonic() - shown > 60:
                print(f"server: {indexed}/{len(vectors)} rows indexed", flush=True)
                shown = time.monotonic()
            time.sleep(1)
        else:
            raise RuntimeError("the server did not index every row within an hour")
        c.release_collection(gallery.collection)
        c.load_collection(gallery.collection)
    return len(vectors) / (time.perf_counter() - t)


def _truth(vectors: np.ndarray, queries: np.ndarray) -> dict[str, list[set[int]]]:
    """Exact top-10 rows per query, unfiltered and on camera 3 (10% of rows)."""
    keep = np.arange(len(vectors)) % CAMERAS == 3
    out: dict[str, list[set[int]]] = {"all": [], "cam": []}
    for q in queries:
        scores = vectors @ q
        out["all"].append(set(np.argpartition(-scores, 10)[:10].tolist()))
        scores[~keep] = -np.inf
        out["cam"].append(set(np.argpartition(-scores, 10)[:10].tolist()))
    return out


def _measure(search, queries: np.ndarray, truth: dict[str, list[set[int]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, where in [("all", GalleryFilter()), ("cam", GalleryFilter(("cam-03",)))]:
        times, recall = [], []
        for q, want in zip(queries, truth[name], strict=True):
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


def _search_rows(
    sizes: list[int],
    backends: list[str],
    n_queries: int,
    work: Path,
    server: MilvusServer | None,
    data: str,
    cache: Path,
    sweep: list[int],
) -> tuple[list, list]:
    rows, sweeps = [], []
    for size in sizes:
        if data == "model":
            vectors, queries = model_vectors(size, n_queries, cache)
        else:
            vectors, queries = unit(size, 1), unit(n_queries, 2)
        truth = _truth(vectors, queries)
        for backend in backends:
            insert_rate, rss = float("nan"), float("nan")
            if backend == "numpy":
                search = _numpy_search(vectors)
            else:
                pid = server.process.pid if backend == "server" and server.process else os.getpid()
                before = _rss_mb(pid)
                uri = server.uri if backend == "server" else str(work / f"lite{size}.db")
                gallery = MilvusGallery(uri, DIM, f"bench_{size}")
                insert_rate = _fill(gallery, vectors)
                rss = _rss_mb(pid) - before
                search = _milvus_search(gallery)
            m = _measure(search, queries, truth)
            rows.append((size, backend, insert_rate, rss, m))
            print(size, backend, f"{insert_rate:.0f} rows/s, +{rss:.0f} MB", m, flush=True)
            if backend != "numpy":
                for ef in sweep:  # one beam for both; the service uses a wider one filtered
                    gallery.search_ef = gallery.filtered_search_ef = ef
                    sweeps.append((size, backend, ef, _measure(search, queries, truth)))
                    print(size, backend, "ef", ef, sweeps[-1][-1], flush=True)
                if backend == "server":
                    gallery._client.drop_collection(gallery.collection)  # free server memory
                gallery.close()
    return rows, sweeps


def _machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _enrol_line(r: dict) -> str:
    enc, e2e = r["encoder_cpu"], r["e2e_cpu"]
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in e2e.items())
    rounds = " / ".join(f"{100 * x:.0f}" for x in r["ratios"])
    return (
        f"| {r['model']} | {r['backend']} | {r['images']} | {_rate(r['encoder'])} "
        f"| {_rate(r['e2e'])} "
        f"| {100 * r['e2e'] / r['encoder']:.0f}% ({rounds}) | {enc['triton']:.2f} | {cpu} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="gallery sizes, comma separated")
    ap.add_argument("--backends", default="lite,server,numpy")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument(
        "--data",
        choices=["model", "random"],
        default="model",
        help="demo-model embeddings of synthetic crops and captions, or random unit vectors",
    )
    ap.add_argument("--cache", type=Path, default=ROOT / ".icl" / "bench-vectors")
    ap.add_argument("--ef-sweep", default="32,64,128,256", help="extra ef values to measure")
    ap.add_argument(
        "--enrol",
        default="demo:2048,vit-b16:256",
        help="encoder:images pairs for the enrolment rounds ('' skips enrolment)",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    backends = [b for b in args.backends.split(",") if b]
    sweep = [int(e) for e in args.ef_sweep.split(",") if e]
    enrol = [(m, int(n)) for m, n in (pair.split(":") for pair in args.enrol.split(",") if pair)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = MilvusServer(work / "milvus-server").start() if "server" in backends else None
        try:
            enrolments = []
            for model_name, n_images in enrol:
                enrolments.append(asyncio.run(_enrol(model_name, n_images, args.batch, work)))
                print(enrolments[-1], flush=True)
                if server is not None:
                    pid = server.process.pid if server.process else 0
                    run = _enrol(model_name, n_images, args.batch, work, server.uri, pid)
                    enrolments.append(asyncio.run(run))
                    print(enrolments[-1], flush=True)
            rows, sweeps = _search_rows(
                sizes, backends, args.queries, work, server, args.data, args.cache, sweep
            )
        finally:
            if server is not None:
                server.stop()
    data = (
        "the demo model's embeddings of synthetic crops (4 per identity), queried with its "
        "text embeddings of captions of gallery identities"
        if args.data == "model"
        else "random unit vectors"
    )
    lines = [
        f"Machine: {_machine()}. HNSW M {HNSW['M']}, efConstruction {HNSW['efConstruction']}, "
        f"ef {SEARCH_EF} (unfiltered) / {FILTERED_SEARCH_EF} (filtered), IP, {DIM}-d.",
        "",
        f"Enrolment: demo crops (PNG) in batches of {args.batch} through an in-process "
        "orchestrator (crop store included) vs the image encoder alone (pre-decoded pixels "
        "straight to the CPU tritonserver, 2 requests in flight). `demo`: the demo encoder "
        "as `icl demo` serves it (1 instance x 1 thread); `vit-b16`: the paper's ViT-B/16 at "
        "384x128 with 2 instances x 1 thread. CPU is ms per image: `python` is this one "
        "process (client, orchestrator, and Milvus Lite when that is the backend). Median of "
        "3 alternating rounds.",
        "",
        "| encoder | gallery | images | encoder alone img/s | Enroll img/s | ratio (each round) "
        "| encoder-alone CPU: triton | Enroll CPU ms/img |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *(_enrol_line(r) for r in enrolments),
        "",
        f"Search: {data}; {args.queries} single queries, top 10, recall@10 against exact "
        f"search; `cam` = one camera of {CAMERAS}, 10% of rows. Insert rate counts until "
        "every row is in an HNSW index; RSS is the growth of the process holding the gallery.",
        "",
        "| rows | backend | insert rows/s | RSS MB | p50 ms | p95 ms | recall@10 | cam p50 ms "
        "| cam p95 ms | cam recall@10 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, backend, rate, rss, m in rows:
        ins = "-" if np.isnan(rate) else f"{rate:.0f}"
        mem = "-" if np.isnan(rss) else f"{rss:.0f}"
        lines.append(
            f"| {size:,} | {backend} | {ins} | {mem} | {m['all_p50']:.2f} | {m['all_p95']:.2f} "
            f"| {m['all_recall']:.3f} | {m['cam_p50']:.2f} | {m['cam_p95']:.2f} "
            f"| {m['cam_recall']:.3f} |"
        )
    if sweeps:
        lines += [
            "",
            "The beam width: the same ef for unfiltered and filtered searches.",
            "",
            "| rows | backend | ef | p50 ms | recall@10 | cam p50 ms | cam recall@10 |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for size, backend, ef, m in sweeps:
            lines.append(
                f"| {size:,} | {backend} | {ef} | {m['all_p50']:.2f} | {m['all_recall']:.3f} "
                f"| {m['cam_p50']:.2f} | {m['cam_recall']:.3f} |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.no_write and DOC.exists():
        text = DOC.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        DOC.write_text(re.sub(f"{re.escape(BEGIN)}.*?{re.escape(END)}", block, text, flags=re.S))


if __name__ == "__main__":
    main()
