"""Performance report: the stack under Locust at rising users, per-stage times, peak memory.

    python benchmarks/performance.py                 # writes docs/PERFORMANCE.md (+ PNG plots)
    python benchmarks/performance.py --sizes 10000 --backends lite --users 1,2 --step-s 8
    python benchmarks/performance.py --quick --out /tmp/perf/PERFORMANCE.md   # smoke run

One tritonserver (demo encoders + demo MLLM), and per stack (gallery size x Milvus Lite or
the Milvus 2.3.5 server) a fresh `icl serve --metrics-port` process and, for the server, a
fresh Milvus process. Locust (`locust -f loadtest/thi.py --headless`) runs once per user
count, plain-only then THI-only; the service's stage histograms are scraped around each run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"
LOCUSTFILE = ROOT / "loadtest" / "thi.py"
QUERIES = ROOT / "loadtest" / "queries.txt"
DEMO_IMAGES = 300  # the demo gallery whose first 100 identities loadtest/queries.txt describes
TOP_K = 10  # the load test's default --icl-top-k
STAGE_METRIC = "icl_stage_duration_seconds"
# The knee: the first step whose RPS grew less than this over the step before, or whose p95
# grew more than KNEE_P95 times; the step before it is the knee.
KNEE_RPS_GAIN = 1.10
KNEE_P95 = 2.0
MODE_LABEL = {"plain": "plain", "thi": "THI"}
TARGETS = {
    "plain_p95_lite_10k_ms": 25.0,
    "plain_p95_server_100k_ms": 20.0,
    "thi_over_plain_p50": 3.0,
    "service_over_parts_p50": 1.5,
}


def _gallery_bench() -> Any:
    """benchmarks/gallery.py (its cached demo-model vectors and row naming)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import gallery

    return gallery


# ---------------------------------------------------------------- the gallery's filler rows
def filler(rows: int, cache: Path) -> np.ndarray:
    """Vectors of filler rows 0..rows-1 with their crops in the crop store `cache/crops`.

    Rows are benchmarks/gallery.py's: the demo image encoder's embeddings of synthetic crops
    (4 per identity), cached in chunks of 10k; each chunk's PNG crops are stored once under
    the rows' ids, with a marker file, so THI finds every candidate's crop."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    g = _gallery_bench()
    crops = cache / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    chunks = range(-(-rows // g.CHUNK))
    files = {i: cache / f"images-{i:04d}.npy" for i in chunks}
    marks = {i: crops / f"chunk-{i:04d}.done" for i in chunks}
    missing = [i for i in chunks if not (files[i].exists() and marks[i].exists())]
    if missing:
        t = time.perf_counter()
        work = partial(g._image_chunk, crop_dir=str(crops))
        ctx = get_context("spawn")
        with ProcessPoolExecutor(os.cpu_count(), ctx, initializer=g._worker_init) as pool:
            for i, vecs in zip(missing, pool.map(work, missing), strict=True):
                np.save(files[i], vecs.astype(np.float32))
                marks[i].touch()
                print(f"filler: chunk {i + 1}/{len(chunks)} {time.perf_counter() - t:.0f} s")
    if rows == 0:
        return np.zeros((0, g.DIM), np.float32)
    return np.concatenate([np.load(files[i]) for i in chunks])[:rows]


# ---------------------------------------------------------------- pure parts (unit-tested)
@dataclass(frozen=True)
class Step:
    """One Locust run at a fixed number of users."""

    mode: str  # "plain" or "thi"
    users: int
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class StageDelta:
    calls: float
    mean_ms: float  # per call


@dataclass(frozen=True)
class Knee:
    users: int  # the last step that still scaled (the last step when none stopped)
    reached: bool  # False: RPS still grew by >10% at the last step measured
    reason: str


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # Locust writes "N/A" for a percentile of no requests
        return math.nan


def locust_step(stats_csv: str, mode: str, users: int) -> Step:
    """The Aggregated row of Locust's `*_stats.csv` (each run has one task kind)."""
    rows = {row["Name"]: row for row in csv.DictReader(stats_csv.splitlines())}
    if "Aggregated" not in rows:
        raise ValueError("Locust's stats CSV has no Aggregated row")
    row = rows["Aggregated"]
    return Step(
        mode=mode,
        users=users,
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        rps=_number(row["Requests/s"]),
        p50_ms=_number(row["50%"]),
        p95_ms=_number(row["95%"]),
        p99_ms=_number(row["99%"]),
    )


def histogram_totals(text: str, metric: str, label: str) -> dict[str, tuple[float, float]]:
    """{value of `label`: (count, sum)} of a Prometheus histogram in exposition text, summed
    over its other labels, in the order the scrape lists them."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            key = sample.labels.get(label)
            if key is None:
                continue
            count, total = out.get(key, (0.0, 0.0))
            if sample.name == f"{metric}_count":
                count += sample.value
            elif sample.name == f"{metric}_sum":
                total += sample.value
            out[key] = (count, total)
    return out


def stage_diff(
    before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]
) -> dict[str, StageDelta]:
    """Calls and mean ms per call of each stage between two scrapes (stages with calls only)."""
    out = {}
    for stage, (count, total) in after.items():
        count0, total0 = before.get(stage, (0.0, 0.0))
        calls = count - count0
        if calls > 0:
            out[stage] = StageDelta(calls, 1000 * (total - total0) / calls)
    return out


def find_knee(steps: Sequence[Step]) -> Knee:
    """The knee of a curve: the step before the first one that no longer scales (RPS up by
    less than 10%, p95 more than doubled, or failures)."""
    if not steps:
        raise ValueError("no steps")
    ordered = sorted(steps, key=lambda s: s.users)
    for prev, cur in itertools.pairwise(ordered):
        if cur.failures and not prev.failures:
            return Knee(prev.users, True, f"{cur.failures} failures at {cur.users} users")
        if not cur.rps >= KNEE_RPS_GAIN * prev.rps:
            why = f"RPS {prev.rps:.1f} -> {cur.rps:.1f} at {cur.users} users (< +10%)"
            return Knee(prev.users, True, why)
        if cur.p95_ms > KNEE_P95 * prev.p95_ms:
            why = f"p95 {prev.p95_ms:.0f} -> {cur.p95_ms:.0f} ms at {cur.users} users (> 2x)"
            return Knee(prev.users, True, why)
    last = ordered[-1]
    return Knee(last.users, False, f"still scaling at {last.users} users, the last step")


def highest_sustained(steps: Sequence[Step]) -> Step | None:
    """The step with the highest RPS among those with requests and no failure."""
    ok = [s for s in steps if s.requests > 0 and s.failures == 0 and not math.isnan(s.rps)]
    return max(ok, key=lambda s: s.rps) if ok else None


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: str = "") -> str:
    """A Markdown table; columns whose index is in `numeric` (e.g. "234") align right."""
    align = ["---:" if str(i) in numeric else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the markers replaced by `block` (appended when absent)."""
    wrapped = f"{BEGIN}\n{block.strip()}\n{END}"
    pattern = re.compile(f"{re.escape(BEGIN)}.*?{re.escape(END)}", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: wrapped, text, count=1)
    return text.rstrip("\n") + "\n\n" + wrapped + "\n"


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---------------------------------------------------------------- processes and their memory
def _vm_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None  # gone meanwhile
    return None


def triton_children(triton_pid: int) -> dict[str, int]:
    """tritonserver's python-backend stubs, named by the model they serve."""
    import psutil

    out: dict[str, int] = {}
    try:
        children = psutil.Process(triton_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        model = next((Path(a).parts[-3] for a in args if a.endswith("model.py")), child.name())
        name, n = f"stub: {model}", 2
        while name in out and out[name] != child.pid:  # a second instance of one model
            name, n = f"stub: {model} #{n}", n + 1
        out[name] = child.pid
    return out


class PeakRss:
    """Peak resident memory (the kernel's VmHWM) of named processes, polled in a thread
    (short-lived ones, like each Locust run, are caught while they live)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peaks_mb: dict[str, float] = {}
        self.pids: dict[str, int] = {}
        self.dynamic: list[Any] = []  # callables returning {name: pid}, asked every poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = dict(self.pids)
        for source in self.dynamic:
            pids.update(source())
        for name, pid in pids.items():
            kb = _vm_kb(pid, "VmHWM")
            if kb is not None:
                self.peaks_mb[name] = max(self.peaks_mb.get(name, 0.0), kb / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """`icl serve --metrics-port` in its own process."""

    triton_url: str
    milvus_uri: str
    collection: str
    crop_dir: Path
    log: Path
    port: int = field(default_factory=_free_port)
    metrics_port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600.0) -> Service:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        cmd = [sys.executable, "-m", "icl.cli", "serve", "--triton-url", self.triton_url]
        cmd += ["--milvus-uri", self.milvus_uri, "--collection", self.collection]
        cmd += ["--crop-dir", str(self.crop_dir), "--mllm-model", "mllm"]
        cmd += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s  # Lite loads the whole gallery at start
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"icl serve exited with {self.process.returncode}: {tail}")
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"icl serve was not SERVING within {timeout_s:.0f} s")
                time.sleep(0.3)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.read().decode()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no call is in flight (a THI search whose Locust client stopped still runs to
        its end and would land in the next scrape window)."""
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = sum(
                sample.value
                for family in text_string_to_metric_families(self.metrics())
                if family.name == "icl_requests_in_flight"
                for sample in family.samples
            )
            if busy == 0:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------- gallery: fill, bare search
def _fill_worker(uri: str, collection: str, rows: int, cache: str) -> dict[str, float]:
    """In a child process (Milvus Lite allows one process per data dir): the filler rows
    straight into the gallery through MilvusGallery, until every row is searchable."""
    from icl.orchestrator.gallery import MilvusGallery

    g = _gallery_bench()
    vectors = filler(rows, Path(cache))
    gallery = MilvusGallery(uri, g.DIM, collection)
    t = time.perf_counter()
    if rows:
        g._fill(gallery, vectors)
    seconds = time.perf_counter() - t
    gallery.close()
    _release_lite()
    return {"rows": rows, "seconds": seconds}


def _release_lite() -> None:
    with contextlib.suppress(ImportError):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_all()  # Lite's data dir is free for the next process


def _bare_search_worker(uri: str, collection: str, vectors: np.ndarray) -> list[float]:
    """In a child process: Milvus search alone (pymilvus, the service's parameters: top_k,
    empty filter, output fields, ef, consistency), ms per query after 20 warm-up queries.

    The collection is opened as the service opens it (MilvusGallery), and on Lite only once
    Lite's background index builds are done (the service had minutes for them)."""
    from icl.orchestrator.gallery import (
        CONSISTENCY,
        META_FIELDS,
        METRIC,
        SEARCH_EF,
        MilvusGallery,
        filter_expression,
    )
    from icl.ports import GalleryFilter

    g = _gallery_bench()
    gallery = MilvusGallery(uri, g.DIM, collection)
    if gallery.local:
        g._lite_settle(gallery)
    client = gallery._client  # pymilvus' MilvusClient, without the adapter around it
    warm = list(vectors[:20])
    times = []
    for i, vec in enumerate([*warm, *vectors]):
        t = time.perf_counter()
        client.search(
            collection,
            data=[np.asarray(vec, np.float32).tolist()],
            limit=TOP_K,
            filter=filter_expression(GalleryFilter()),
            output_fields=META_FIELDS,
            search_params={"metric_type": METRIC, "params": {"ef": max(TOP_K, SEARCH_EF)}},
            consistency_level=CONSISTENCY,
        )
        if i >= len(warm):
            times.append(1000 * (time.perf_counter() - t))
    gallery.close()
    _release_lite()
    return times


def _in_child(fn: Any, *args: Any) -> Any:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bare_triton_text(url: str, queries: Sequence[str]) -> tuple[list[float], np.ndarray]:
    """Triton's text_encoder alone (tritonclient gRPC, one query per call): ms per call after
    5 warm-up calls, and the embeddings."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(url)
    times, vectors = [], []
    warm = list(queries[:5])
    for i, text in enumerate([*warm, *queries]):
        data = np.array([[text.encode("utf-8")]], dtype=np.object_)
        inp = tc.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        t = time.perf_counter()
        result = client.infer("text_encoder", [inp], outputs=[tc.InferRequestedOutput("EMBEDDING")])
        elapsed = 1000 * (time.perf_counter() - t)
        if i >= len(warm):
            times.append(elapsed)
            vectors.append(result.as_numpy("EMBEDDING")[0])
    client.close()
    return times, np.stack(vectors)


# ---------------------------------------------------------------- the service, end to end
def enrol_demo(address: str, n_images: int) -> int:
    """The demo gallery's crops through Enroll (image encoder, crop store, gallery)."""
    import grpc

    from icl.cli.demo import demo_enroll_item
    from icl.synthetic.demo_gallery import demo_gallery
    from icl_api import pb, pb_grpc
    from icl_api.client import channel_options

    items = [demo_enroll_item(d) for d in demo_gallery(n_images)]

    def batches() -> Iterator[Any]:
        for i in range(0, len(items), 32):
            yield pb.EnrollRequest(images=items[i : i + 32])

    with grpc.insecure_channel(address, options=channel_options()) as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        replies = stub.Enroll(batches(), timeout=600)
        return sum(r.status == pb.EnrollResult.ACCEPTED for reply in replies for r in reply.results)


def sequential(address: str, queries: Sequence[str], thi: bool) -> tuple[list[float], int]:
    """One Search after another (a single user): ms each, and THI fallbacks on a failure."""
    import grpc

    from icl.thi.engine import is_failure
    from icl_api import pb_grpc
    from icl_api.client import channel_options, search_request

    times, failed = [], 0
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        for text in queries:
            request = search_request(text, top_k=TOP_K)
            if thi:
                request.thi.enabled = True
                request.thi.candidates = 5  # the load test's --icl-thi-candidates
            t = time.perf_counter()
            reply = stub.Search(request, timeout=60)
            times.append(1000 * (time.perf_counter() - t))
            failed += bool(thi and is_failure(reply.thi_trace.fallback_reason))
    return times, failed


def run_locust(address: str, mode: str, users: int, step_s: float, out: Path, rss: PeakRss) -> Step:
    """`locust -f loadtest/thi.py --headless` with only `mode`'s task, `users` at once."""
    weights = {"plain": "0", "filtered": "0", "thi": "0", "stream": "0", "enroll": "0"}
    weights[mode] = "1"
    prefix = out / f"{mode}-u{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", address]
    cmd += ["-u", str(users), "-r", str(users), "-t", f"{step_s:g}s", "--csv", str(prefix)]
    cmd += ["--only-summary", "--loglevel", "WARNING", "--icl-queries", str(QUERIES)]
    cmd += ["--icl-top-k", str(TOP_K)]
    for task, weight in weights.items():
        cmd += [f"--icl-{task}-weight", weight]
    env = {**os.environ, "ICL_ADDRESS": address}
    with open(f"{prefix}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        rss.pids["locust"] = proc.pid
        try:
            proc.wait(timeout=step_s + 120)
        finally:
            rss.sample()
            rss.pids.pop("locust", None)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():  # exit code 1 only means some requests failed
        tail = Path(f"{prefix}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"locust wrote no stats (exit {proc.returncode}): {tail}")
    return locust_step(stats.read_text(), mode, users)


def run_stack(
    size: int,
    backend: str,
    args: argparse.Namespace,
    triton: Any,
    work: Path,
    rss: PeakRss,
) -> dict[str, Any]:
    """One gallery size on one backend: fill, serve, Locust steps, sequential and bare."""
    from icl.orchestrator.milvus_server import MilvusServer

    name = f"{backend}-{size}"
    out = work / name
    out.mkdir(parents=True)
    queries = [q for q in QUERIES.read_text().splitlines() if q and not q.startswith("#")]
    seq_queries = (queries * (1 + args.seq_queries // len(queries)))[: args.seq_queries]
    result: dict[str, Any] = {"size": size, "backend": backend, "steps": [], "stages": {}}
    collection = f"perf_{size}"
    server = None
    service: Service | None = None
    rss_before = set(rss.peaks_mb)
    try:
        if backend == "server":
            server = MilvusServer(out / "milvus").start()
            assert server.process is not None
            rss.pids["milvus server"] = server.process.pid
            uri = server.uri
            result["milvus_version"] = _milvus_server_version(uri)
        else:
            uri = str(out / "gallery.db")
        rows = size - args.demo_images
        fill = _in_child(_fill_worker, uri, collection, rows, str(args.cache))
        result["fill"] = fill
        print(f"[{name}] {rows} filler rows written in {fill['seconds']:.0f} s", flush=True)
        service = Service(triton.grpc_url, uri, collection, args.cache / "crops", out / "serve.log")
        t = time.perf_counter()
        service.start()
        assert service.process is not None
        rss.pids["icl serve" + (" (+ Milvus Lite)" if backend == "lite" else "")] = (
            service.process.pid
        )
        result["service_start_s"] = time.perf_counter() - t
        accepted = enrol_demo(service.address, args.demo_images)
        if accepted != args.demo_images:
            raise RuntimeError(f"Enroll accepted {accepted} of {args.demo_images} demo crops")
        result["enrolled"] = accepted
        sequential(service.address, queries[:10], thi=False)  # warm up both paths
        sequential(service.address, queries[:5], thi=True)
        for mode in args.modes:
            service.wait_idle()
            first = last = histogram_totals(service.metrics(), STAGE_METRIC, "stage")
            for users in args.users:
                step = run_locust(service.address, mode, users, args.step_s, out, rss)
                result["steps"].append(step.__dict__)
                print(f"[{name}] {step}", flush=True)
            service.wait_idle()
            last = histogram_totals(service.metrics(), STAGE_METRIC, "stage")
            requests = sum(s["requests"] for s in result["steps"] if s["mode"] == mode)
            result["stages"][mode] = {
                "requests": requests,
                "stages": {k: v.__dict__ for k, v in stage_diff(first, last).items()},
            }
        # Sequential single-user searches, then the bare parts, close together in time.
        service.wait_idle()
        scrapes = [histogram_totals(service.metrics(), STAGE_METRIC, "stage")]
        plain, _ = sequential(service.address, seq_queries, thi=False)
        scrapes.append(histogram_totals(service.metrics(), STAGE_METRIC, "stage"))
        thi, thi_failed = sequential(service.address, seq_queries, thi=True)
        scrapes.append(histogram_totals(service.metrics(), STAGE_METRIC, "stage"))
        result["stages_seq"] = {
            mode: {
                "requests": len(seq_queries),
                "stages": {k: v.__dict__ for k, v in stage_diff(a, b).items()},
            }
            for mode, a, b in (("plain", *scrapes[:2]), ("thi", *scrapes[1:]))
        }
        text_ms, vectors = bare_triton_text(triton.grpc_url, seq_queries)
        rss.sample()
        service.stop()
        milvus_ms = _in_child(_bare_search_worker, uri, collection, vectors)
        result["sequential"] = {
            "queries": len(seq_queries),
            "plain_p50": float(np.percentile(plain, 50)),
            "plain_p95": float(np.percentile(plain, 95)),
            "thi_p50": float(np.percentile(thi, 50)),
            "thi_p95": float(np.percentile(thi, 95)),
            "thi_failed": thi_failed,
            "triton_text_p50": float(np.percentile(text_ms, 50)),
            "milvus_p50": float(np.percentile(milvus_ms, 50)),
        }
        print(f"[{name}] sequential {result['sequential']}", flush=True)
    except Exception as exc:  # one stack's failure is reported; the others still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {result['error']}", flush=True)
    finally:
        rss.sample()
        if service is not None:
            service.stop()
        if server is not None:
            server.stop()
        for key in ("milvus server", "icl serve", "icl serve (+ Milvus Lite)"):
            rss.pids.pop(key, None)
    # Peaks of this stack's own processes; tritonserver and its stubs live for the whole run.
    result["rss_mb"] = dict(rss.peaks_mb)
    for key in set(rss.peaks_mb) - rss_before:
        if key in ("milvus server", "icl serve", "icl serve (+ Milvus Lite)", "locust"):
            rss.peaks_mb.pop(key)
    rss.peaks_mb.pop("locust", None)
    return result


def _milvus_server_version(uri: str) -> str:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        return str(client.get_server_version())
    finally:
        client.close()


# ---------------------------------------------------------------- machine facts
def machine_facts() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    facts = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram_gib": f"{mem:.0f}",
        "python": platform.python_version(),
        "load_start": Path("/proc/loadavg").read_text().split()[0],
    }
    for package in ("pymilvus", "milvus-lite", "milvus", "locust", "tritonclient"):
        try:
            facts[package] = version(package)
        except PackageNotFoundError:
            facts[package] = "-"
    return facts


def _triton_version(http_url: str) -> str:
    with urllib.request.urlopen(f"http://{http_url}/v2", timeout=10) as reply:
        return str(json.loads(reply.read())["version"])


# ---------------------------------------------------------------- the report
def _users(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def _stack_name(r: Mapping[str, Any]) -> str:
    backend = "Milvus Lite" if r["backend"] == "lite" else "Milvus server"
    return f"{r['size']:,} / {backend}"


def _steps(r: Mapping[str, Any], mode: str) -> list[Step]:
    return [Step(**s) for s in r["steps"] if s["mode"] == mode]


def _target_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Each target of the issue with the measured figure and met / not met."""

    def stack(size: int, backend: str) -> Mapping[str, Any] | None:
        for r in results["stacks"]:
            if r["size"] == size and r["backend"] == backend and not r.get("error"):
                return r
        return None

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**not met**")

    rows = []
    for size, backend, key, label in (
        (10_000, "lite", "plain_p95_lite_10k_ms", "10k, Milvus Lite"),
        (100_000, "server", "plain_p95_server_100k_ms", "100k, Milvus server"),
    ):
        limit = TARGETS[key]
        r = stack(size, backend)
        best = highest_sustained(_steps(r, "plain")) if r else None
        ok = None if r is None else bool(best and best.p95_ms < limit)
        single = [st for st in _steps(r, "plain") if st.users == 1] if r else []
        measured = (
            f"p95 {fmt(best.p95_ms, 0)} ms at {fmt(best.rps)} RPS ({_users(best.users)})"
            if best
            else ("every step failed" if r else "-")
        )
        if best and single and best.users != 1:
            measured += f"; 1 user: p95 {fmt(single[0].p95_ms, 0)} ms at {fmt(single[0].rps)} RPS"
        rows.append(
            [
                f"plain Search p95 < {limit:g} ms at the highest sustained RPS, no "
                f"failures ({label})",
                measured,
                verdict(ok),
            ]
        )
    for r in results["stacks"]:
        seq = r.get("sequential")
        if not seq:
            continue
        ratio = seq["thi_p50"] / seq["plain_p50"]
        rows.append(
            [
                f"THI (lean) p50 <= {TARGETS['thi_over_plain_p50']:g}x plain p50 "
                f"({_stack_name(r)})",
                f"{seq['thi_p50']:.1f} / {seq['plain_p50']:.1f} ms = {ratio:.1f}x",
                verdict(ratio <= TARGETS["thi_over_plain_p50"]),
            ]
        )
    for r in results["stacks"]:
        seq = r.get("sequential")
        if not seq:
            continue
        parts = seq["triton_text_p50"] + seq["milvus_p50"]
        ratio = seq["plain_p50"] / parts
        rows.append(
            [
                f"service plain p50 / (Triton text + Milvus alone) < "
                f"{TARGETS['service_over_parts_p50']:g} ({_stack_name(r)})",
                f"{seq['plain_p50']:.1f} / ({seq['triton_text_p50']:.1f} + {seq['milvus_p50']:.1f})"
                f" ms = {ratio:.2f}",
                verdict(ratio < TARGETS["service_over_parts_p50"]),
            ]
        )
    return rows


def _stage_table(results: Mapping[str, Any], key: str, mode: str, when: str) -> list[str]:
    """One stage table: a row per stage, a column per stack (mean ms per call, calls/req)."""
    named = [r for r in results["stacks"] if mode in r.get(key, {})]
    stages: list[str] = []
    for r in named:
        stages += [k for k in r[key][mode]["stages"] if k not in stages]
    if not stages:
        return []
    rows = []
    for stage in stages:
        row = [stage]
        for r in named:
            d = r[key][mode]["stages"].get(stage)
            n = r[key][mode]["requests"]
            row.append(f"{d['mean_ms']:.1f} ({d['calls'] / n:.2f})" if d and n else "-")
        rows.append(row)
    header = [
        f"{MODE_LABEL[mode]}, {when}: stage",
        *(f"{_stack_name(r)}: ms/call (calls/req)" for r in named),
    ]
    return [md_table(header, rows, "".join(str(i + 1) for i in range(len(named)))), ""]


def render_report(results: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The generated part of docs/PERFORMANCE.md."""
    m, s = results["machine"], results["settings"]
    lines = [
        f"Measured {results['date']} in {results['duration_s'] / 60:.0f} min. Machine: "
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, load average {m['load_start']} "
        f"at the start and {m.get('load_end', '?')} at the end (the benchmark's own processes "
        "included). "
        f"tritonserver {m.get('tritonserver', '?')} (CPU, python backend), Milvus server "
        f"{m.get('milvus_server', '-')} (PyPI `milvus` {m['milvus']}), Milvus Lite "
        f"{m['milvus-lite']}, pymilvus {m['pymilvus']}, Locust {m['locust']}, "
        f"Python {m['python']}.",
        "",
        f"Each gallery: the {s['demo_images']} demo crops through Enroll and `size - "
        f"{s['demo_images']}` filler rows written straight into Milvus (see How the galleries "
        "are filled). Locust: "
        f"{', '.join(map(str, s['users']))} users, {s['step_s']:g} s each, one Locust run "
        f"per step, plain-only or THI-only (lean, K 5), top_k {TOP_K}, the "
        f"{s['query_count']} captions of loadtest/queries.txt. Sequential: "
        f"{s['seq_queries']} searches one after another after the Locust runs.",
        "",
        "### Targets",
        "",
        md_table(["target", "measured", "verdict"], _target_rows(results)),
        "",
        "### Throughput and latency per step",
        "",
    ]
    for r in results["stacks"]:
        lines += [f"**{_stack_name(r)}**", ""]
        if r.get("error"):
            lines += [f"Failed: `{r['error']}`", ""]
        rows = []
        for mode in s["modes"]:
            steps = _steps(r, mode)
            for st in steps:
                rows.append(
                    [
                        MODE_LABEL[mode],
                        st.users,
                        st.requests,
                        st.failures,
                        fmt(st.rps),
                        fmt(st.p50_ms, 0),
                        fmt(st.p95_ms, 0),
                        fmt(st.p99_ms, 0),
                    ]
                )
        if rows:
            lines += [
                md_table(
                    ["mode", "users", "requests", "failures", "RPS", "p50 ms", "p95 ms", "p99 ms"],
                    rows,
                    "1234567",
                ),
                "",
            ]
        for mode in s["modes"]:
            steps = _steps(r, mode)
            if not steps:
                continue
            knee, best = find_knee(steps), highest_sustained(steps)
            where = (
                f"knee at {_users(knee.users)} ({knee.reason})"
                if knee.reached
                else f"no knee up to {_users(knee.users)} (RPS still grew by 10% or more)"
            )
            top = (
                f"highest sustained {best.rps:.1f} RPS at {_users(best.users)}, p95 "
                f"{best.p95_ms:.0f} ms"
                if best
                else "no step without failures"
            )
            lines.append(f"- {MODE_LABEL[mode]}: {where}; {top}.")
        lines.append("")
    lines += [
        "### Where the time goes (per stage, from `icl_stage_duration_seconds`)",
        "",
        "Mean ms per call of each stage the service timed, and calls per request: from the "
        "difference of /metrics scrapes before and after the sequential single-user "
        "searches, and before and after the Locust runs of a mode (every user count, so "
        "stages wait for the CPU the other users hold).",
        "",
    ]
    for key, when in (("stages_seq", "single user"), ("stages", "under load, Locust")):
        for mode in s["modes"]:
            lines += _stage_table(results, key, mode, when)
    lines += ["### Single user, and the service against its parts", ""]
    rows = []
    for r in results["stacks"]:
        seq = r.get("sequential")
        if seq:
            rows.append(
                [
                    _stack_name(r),
                    fmt(seq["plain_p50"]),
                    fmt(seq["plain_p95"]),
                    fmt(seq["thi_p50"]),
                    fmt(seq["thi_p95"]),
                    seq["thi_failed"],
                    fmt(seq["triton_text_p50"]),
                    fmt(seq["milvus_p50"]),
                    f"{seq['plain_p50'] / (seq['triton_text_p50'] + seq['milvus_p50']):.2f}",
                ]
            )
    if rows:
        lines += [
            "p50/p95 of sequential Searches through the service; Triton text_encoder alone "
            "(tritonclient gRPC, one caption per call) and Milvus search alone (pymilvus, same "
            "top_k, filter, output fields and search parameters as the service, in its own "
            "process once the service has stopped) over the same captions.",
            "",
            md_table(
                [
                    "stack",
                    "plain p50",
                    "plain p95",
                    "THI p50",
                    "THI p95",
                    "THI MLLM failures",
                    "Triton text p50",
                    "Milvus p50",
                    "plain / (text + Milvus)",
                ],
                rows,
                "12345678",
            ),
            "",
        ]
    lines += ["### Peak memory (VmHWM, MB)", ""]
    procs: list[str] = []
    for r in results["stacks"]:
        procs += [p for p in r.get("rss_mb", {}) if p not in procs]
    if procs:
        rows = [
            [p, *(fmt(r.get("rss_mb", {}).get(p), 0) for r in results["stacks"])] for p in procs
        ]
        header = ["process", *(_stack_name(r) for r in results["stacks"])]
        lines += [
            "Milvus Lite runs inside the service's process (threads, no process of its own). "
            "tritonserver and its stubs serve every stack; their peak is the run's so far.",
            "",
            md_table(header, rows, "".join(str(i + 1) for i in range(len(results["stacks"])))),
            "",
        ]
    for title, path in images.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], out_dir: Path, doc_dir: Path) -> dict[str, str]:
    """PNG plots; returns {title: path relative to the doc}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = results["settings"]["modes"]
    stacks = [r for r in results["stacks"] if r["steps"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if stacks:
        fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
        for col, mode in enumerate(modes):
            lat, rps = axes[0][col], axes[1][col]
            for i, r in enumerate(stacks):
                steps = sorted(_steps(r, mode), key=lambda st: st.users)
                users = [st.users for st in steps]
                colour = f"C{i}"
                lat.plot(
                    users,
                    [st.p95_ms for st in steps],
                    "-o",
                    color=colour,
                    label=f"{_stack_name(r)} p95",
                )
                lat.plot(
                    users,
                    [st.p50_ms for st in steps],
                    "--",
                    color=colour,
                    label=f"{_stack_name(r)} p50",
                )
                rps.plot(users, [st.rps for st in steps], "-o", color=colour, label=_stack_name(r))
            label = MODE_LABEL[mode]
            lat.set(title=f"{label} Search latency", xlabel="users", ylabel="ms", yscale="log")
            rps.set(title=f"{label} Search throughput", xlabel="users", ylabel="requests/s")
            ticks = sorted({st["users"] for r in stacks for st in r["steps"]})
            for ax in (lat, rps):
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "performance-latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images["Latency and throughput against users"] = os.path.relpath(path, doc_dir)
    key = "stages_seq" if any(r.get("stages_seq") for r in results["stacks"]) else "stages"
    when = "single user" if key == "stages_seq" else "under load"
    staged = [r for r in results["stacks"] if r.get(key)]
    if staged:
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 5), squeeze=False)
        for col, mode in enumerate(modes):
            ax = axes[0][col]
            names: list[str] = []
            for r in staged:
                names += [k for k in r[key].get(mode, {}).get("stages", {}) if k not in names]
            height = 0.8 / max(1, len(staged))
            for i, r in enumerate(staged):
                data = r[key].get(mode, {}).get("stages", {})
                ys = [j + i * height for j in range(len(names))]
                ax.barh(
                    ys,
                    [data.get(n, {}).get("mean_ms", 0.0) for n in names],
                    height,
                    label=_stack_name(r),
                    color=f"C{i}",
                )
            ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))], names)
            ax.invert_yaxis()
            ax.set(title=f"{MODE_LABEL[mode]} Search, {when}: ms per stage call", xlabel="ms")
            ax.grid(True, axis="x", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "performance-stages.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images["Per-stage time"] = os.path.relpath(path, doc_dir)
    return images


TEMPLATE = """# Performance

Written by `python benchmarks/performance.py` (the tables and plots between the markers are
regenerated on every run).

{block}
"""


def write_report(results: Mapping[str, Any], doc: Path) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    out_dir = doc.parent / "performance"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    block = render_report(results, plot(results, out_dir, doc.parent))
    text = doc.read_text() if doc.exists() else TEMPLATE.format(block=f"{BEGIN}\n{END}")
    doc.write_text(replace_block(text, block))


# ---------------------------------------------------------------- main
def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: comma-separated whole numbers, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{what}: at least one number, each >= 1")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="gallery sizes, comma separated")
    ap.add_argument("--backends", default="lite,server", help="lite and/or server")
    ap.add_argument("--modes", default="plain,thi", help="plain and/or thi")
    ap.add_argument("--users", default="1,2,4,8", help="Locust users per step")
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per Locust step")
    ap.add_argument("--seq-queries", type=int, default=50, help="sequential searches")
    ap.add_argument("--demo-images", type=int, default=DEMO_IMAGES)
    ap.add_argument("--cache", type=Path, default=ROOT / ".icl" / "bench-vectors")
    ap.add_argument("--out", type=Path, default=DOC, help="the Markdown report to write")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1,000 images, Lite, 1 user, 3 s"
    )
    ap.add_argument("--render-only", type=Path, help="re-render the report from a results.json")
    args = ap.parse_args(argv)
    if args.render_only:
        write_report(json.loads(args.render_only.read_text()), args.out)
        print(f"wrote {args.out}")
        return
    if args.quick:
        args.sizes, args.backends, args.users, args.step_s = "1000", "lite", "1", 3.0
        args.seq_queries = 10
    sizes = _ints(args.sizes, "--sizes")
    args.users = _ints(args.users, "--users")
    backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(backends) - {"lite", "server"} or not backends:
        raise SystemExit(f"--backends: lite and/or server, not {args.backends!r}")
    if set(args.modes) - {"plain", "thi"} or not args.modes:
        raise SystemExit(f"--modes: plain and/or thi, not {args.modes!r}")
    if min(sizes) < args.demo_images:
        raise SystemExit(f"--sizes: each at least --demo-images ({args.demo_images})")
    if args.step_s <= 0 or args.seq_queries < 1:
        raise SystemExit("--step-s and --seq-queries must be positive")
    args.cache = args.cache.resolve()
    from icl.demo import DEMO_WEIGHTS, demo_path
    from icl.export.mllm_repository import write_mllm_model
    from icl.export.repository import write_repository
    from icl.models.dual_encoder import load_checkpoint
    from icl.orchestrator.tritonserver import TritonServer

    started = time.monotonic()
    facts = machine_facts()
    filler(max(sizes) - args.demo_images, args.cache)  # built once, before any timing
    stacks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="icl-perf-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        write_repository(load_checkpoint(demo_path(DEMO_WEIGHTS)), repo)
        write_mllm_model(repo, "demo", None)
        with TritonServer(repo, work / "triton.log") as triton, PeakRss() as rss:
            assert triton.process is not None
            facts["tritonserver"] = _triton_version(triton.http_url)
            rss.pids["tritonserver"] = triton.process.pid
            rss.dynamic.append(lambda: triton_children(triton.process.pid))
            for size in sizes:
                for backend in backends:
                    stacks.append(run_stack(size, backend, args, triton, work, rss))
                    if backend == "server" and "milvus_version" in stacks[-1]:
                        facts["milvus_server"] = stacks[-1]["milvus_version"]
        if os.environ.get("ICL_PERF_KEEP"):  # debugging: keep the logs and Locust CSVs
            shutil.copytree(work, os.environ["ICL_PERF_KEEP"], dirs_exist_ok=True)
    facts["load_end"] = Path("/proc/loadavg").read_text().split()[0]
    n_queries = len([q for q in QUERIES.read_text().splitlines() if q and not q.startswith("#")])
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "duration_s": time.monotonic() - started,
        "machine": facts,
        "settings": {
            "sizes": sizes,
            "backends": backends,
            "modes": args.modes,
            "users": args.users,
            "step_s": args.step_s,
            "seq_queries": args.seq_queries,
            "demo_images": args.demo_images,
            "query_count": n_queries,
        },
        "stacks": stacks,
    }
    write_report(results, args.out)
    print(f"wrote {args.out} in {(time.monotonic() - started) / 60:.1f} min")
    if any(r.get("error") for r in stacks):
        raise SystemExit("some stacks failed; see the report")


if __name__ == "__main__":
    main()
