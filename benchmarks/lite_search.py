"""Where a Milvus Lite search spends its time, by gallery size and by hits returned.

    python benchmarks/lite_search.py                  # 1k, 10k, 100k rows; docs/PERFORMANCE.md
    python benchmarks/lite_search.py --sizes 1000,10000 --out /tmp/lite.md

The gallery adapter (orchestrator/gallery.py) on Milvus Lite, filled with random unit vectors
through its own upsert (exact search: what the vectors hold does not change the cost), then
single searches one after another: top 10 and top 100, unfiltered and filtered to one of 10
cameras. The table also gives the data files (segments) Lite holds after the bulk fill, and
two slopes fitted in the same run: milliseconds per 10k rows scanned (the per-search walk
over every row) and per hit returned (each hit's row is read whole). Reruns refresh the part
of docs/PERFORMANCE.md between this script's markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from icl.orchestrator.gallery import MilvusGallery
from icl.ports import GalleryFilter, GalleryRecord

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- lite-search:begin -->", "<!-- lite-search:end -->"
DIM = 512
CAMERAS = 10
BATCH = 2000


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(gallery: MilvusGallery, n: int) -> float:
    start = time.perf_counter()
    for lo in range(0, n, BATCH):
        vectors = unit(min(BATCH, n - lo), seed=lo)
        gallery.upsert(
            [
                GalleryRecord(f"r{lo + i:07d}", f"cam-{(lo + i) % CAMERAS:02d}", lo + i, "", "", v)
                for i, v in enumerate(vectors)
            ]
        )
    return time.perf_counter() - start


def p50(gallery: MilvusGallery, k: int, where: GalleryFilter, queries: np.ndarray) -> float:
    gallery.search(queries[0], k, where)  # the first call after a fill flushes
    times = []
    for q in queries:
        start = time.perf_counter()
        gallery.search(q, k, where)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50))


def data_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and p.suffix in (".parquet", ".arrow"))


def measure(n: int, queries: np.ndarray) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        gallery = MilvusGallery(str(Path(tmp) / "lite.db"), DIM, "bench")
        try:
            fill_s = fill(gallery, n)
            one_camera = GalleryFilter(camera_ids=("cam-03",))
            row = {
                "rows": n,
                "fill_s": fill_s,
                "top10": p50(gallery, 10, GalleryFilter(), queries),
                "top100": p50(gallery, 100, GalleryFilter(), queries),
                "filtered10": p50(gallery, 10, one_camera, queries),
            }
        finally:
            gallery.close()
        row["files"] = data_files(Path(tmp))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    queries = unit(args.queries, seed=10**9)
    rows = []
    for n in sizes:
        rows.append(measure(n, queries))
        print(rows[-1], flush=True)
    x = np.array([r["rows"] for r in rows], dtype=float)
    y = np.array([r["top10"] for r in rows])
    per_10k = float(np.polyfit(x, y, 1)[0] * 10_000) if len(rows) > 1 else float("nan")
    per_hit = float(np.median([(r["top100"] - r["top10"]) / 90 for r in rows]))
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"milvus-lite {version('milvus-lite')}, pymilvus {version('pymilvus')}; FLAT index, "
        f"{DIM}-d random unit vectors, {CAMERAS} cameras; p50 of {args.queries} single "
        "searches through the gallery adapter.",
        "",
        "| rows | fill s | data files | top 10 ms | top 100 ms | top 10, one camera ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rows']:,} | {r['fill_s']:.1f} | {r['files']} | {r['top10']:.1f} "
            f"| {r['top100']:.1f} | {r['filtered10']:.1f} |"
        )
    lines += [
        "",
        f"Fitted in this run: {per_10k:.1f} ms per 10k rows scanned (top 10) and "
        f"{per_hit:.2f} ms per hit returned.",
    ]
    table = "\n".join(lines)
    print(table)
    block = f"{BEGIN}\n{table}\n{END}"
    text = args.out.read_text() if args.out.exists() else "# Performance\n\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
