"""benchmarks/performance.py's pure parts: the stage histograms' diff read from the service's
own metrics exposition, Locust's stats CSV, the knee of a curve, the highest sustained step,
the Markdown table and block, and targets judged from the measured figures. The benchmark
itself (minutes, every server) is run by hand: `python benchmarks/performance.py --quick`."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from benchmarks import performance as perf
from icl.orchestrator.metrics import ServiceMetrics

pytestmark = pytest.mark.unit

# The header and rows Locust 2.47 writes (a smoke run's plain-u1_stats.csv).
STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,\
Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,\
80%,90%,95%,98%,99%,99.9%,99.99%,100%
grpc,Search [plain],81,2,36,36.2,19.4,62.0,461.6,27.36,0.0,36,39,40,41,44,47,56,62,62,62,62
,Aggregated,81,2,36,36.2,19.4,62.0,461.6,27.36,0.0,36,39,40,41,44,47,56,62,62,62,62
"""


def test_stage_diff_from_the_service_metrics() -> None:
    metrics = ServiceMetrics()
    metrics.stage_seconds.labels("text_encode").observe(0.5)
    before = perf.histogram_totals(
        generate_latest(metrics.registry).decode(), perf.STAGE_METRIC, "stage"
    )
    # Every stage the service declares is listed, in its order, from the first scrape.
    assert list(before)[:2] == ["text_encode", "image_encode"]
    for seconds in (0.002, 0.004):
        metrics.stage_seconds.labels("text_encode").observe(seconds)
    metrics.stage_seconds.labels("gallery_search").observe(0.010)
    metrics.stage_seconds.labels("a_new_stage").observe(0.001)  # read from the scrape, not a list
    after = perf.histogram_totals(
        generate_latest(metrics.registry).decode(), perf.STAGE_METRIC, "stage"
    )
    diff = perf.stage_diff(before, after)
    assert set(diff) == {"text_encode", "gallery_search", "a_new_stage"}
    assert diff["text_encode"].calls == 2
    assert diff["text_encode"].mean_ms == pytest.approx(3.0)
    assert diff["gallery_search"].mean_ms == pytest.approx(10.0)
    assert diff["a_new_stage"].calls == 1


def test_histogram_totals_sum_over_other_labels() -> None:
    metrics = ServiceMetrics()
    metrics.request_seconds.labels("Search", "OK").observe(0.1)
    metrics.request_seconds.labels("Search", "UNAVAILABLE").observe(0.3)
    metrics.request_seconds.labels("Enroll", "OK").observe(1.0)
    text = generate_latest(metrics.registry).decode()
    totals = perf.histogram_totals(text, "icl_request_duration_seconds", "rpc")
    assert totals["Search"] == (2.0, pytest.approx(0.4))
    assert totals["Enroll"] == (1.0, pytest.approx(1.0))


def test_locust_stats_row() -> None:
    step = perf.locust_step(STATS_CSV, "plain", 1)
    assert (step.requests, step.failures, step.p50_ms, step.p95_ms, step.p99_ms) == (
        81,
        2,
        36,
        47,
        62,
    )
    assert step.rps == pytest.approx(27.36)
    empty = STATS_CSV.replace(",81,2,36,", ",0,0,0,").replace("27.36", "0.0")
    empty = empty.replace(",36,39,40,41,44,47,56,62,62,62,62", ",N/A" * 11)
    assert math.isnan(perf.locust_step(empty, "plain", 1).p95_ms)
    with pytest.raises(ValueError, match="Aggregated"):
        perf.locust_step(STATS_CSV.splitlines()[0], "plain", 1)


def _step(users: int, rps: float, p95: float, failures: int = 0) -> perf.Step:
    return perf.Step("plain", users, 100, failures, rps, p95 / 2, p95, p95 * 1.5)


def test_knee_where_rps_stops_growing() -> None:
    steps = [_step(4, 30, 20), _step(1, 10, 10), _step(2, 19, 12), _step(8, 32, 60)]
    knee = perf.find_knee(steps)  # order of the steps does not matter
    assert (knee.users, knee.reached) == (4, True)
    assert "< +10%" in knee.reason


def test_knee_where_p95_doubles_or_requests_fail() -> None:
    knee = perf.find_knee([_step(1, 10, 10), _step(2, 19, 12), _step(4, 30, 30)])
    assert (knee.users, knee.reached) == (2, True)
    assert "> 2x" in knee.reason
    knee = perf.find_knee([_step(1, 10, 10), _step(2, 19, 12, failures=3)])
    assert (knee.users, knee.reached) == (1, True)
    assert "failures" in knee.reason


def test_no_knee_while_still_scaling() -> None:
    knee = perf.find_knee([_step(1, 10, 10), _step(2, 19, 12), _step(4, 35, 14)])
    assert (knee.users, knee.reached) == (4, False)
    with pytest.raises(ValueError):
        perf.find_knee([])


def test_highest_sustained_skips_failing_steps() -> None:
    steps = [_step(1, 10, 10), _step(2, 19, 12), _step(4, 25, 30, failures=1)]
    best = perf.highest_sustained(steps)
    assert best is not None and best.users == 2
    assert perf.highest_sustained([_step(1, 10, 10, failures=1)]) is None


def test_markdown_table_and_block() -> None:
    table = perf.md_table(["stage", "ms"], [["text_encode", "1.5"]], numeric="1")
    assert table.splitlines() == ["| stage | ms |", "|---|---:|", "| text_encode | 1.5 |"]
    with pytest.raises(ValueError, match="cells"):
        perf.md_table(["a", "b"], [["only one"]])
    doc = f"# Title\n\nintro\n\n{perf.BEGIN}\nold\n{perf.END}\n\nafter\n"
    new = perf.replace_block(doc, "new table")
    assert new == f"# Title\n\nintro\n\n{perf.BEGIN}\nnew table\n{perf.END}\n\nafter\n"
    assert perf.replace_block(new, "again").count(perf.BEGIN) == 1
    appended = perf.replace_block("# Title\n", "t")
    assert appended == f"# Title\n\n{perf.BEGIN}\nt\n{perf.END}\n"


def _stack(size: int, backend: str, p95: float, plain: float, thi: float) -> dict:
    steps = [_step(1, 50, p95 / 2).__dict__, _step(2, 90, p95).__dict__]
    return {
        "size": size,
        "backend": backend,
        "steps": steps,
        "stages": {},
        "sequential": {
            "queries": 10,
            "plain_p50": plain,
            "plain_p95": plain * 2,
            "thi_p50": thi,
            "thi_p95": thi * 2,
            "thi_failed": 0,
            "triton_text_p50": 4.0,
            "milvus_p50": 4.0,
        },
    }


def test_targets_are_judged_from_the_figures() -> None:
    results = {
        "stacks": [
            _stack(10_000, "lite", p95=24, plain=10, thi=29),
            _stack(100_000, "server", p95=21, plain=13, thi=40),
        ]
    }
    rows = {row[0]: row for row in perf._target_rows(results)}
    verdicts = [row[2] for row in rows.values()]
    lite, server = next(iter(rows.values())), list(rows.values())[1]
    assert "p95 24 ms at 90.0 RPS (2 users)" in lite[1] and lite[2] == "**met**"
    assert "p95 21 ms" in server[1] and server[2] == "**not met**"
    # THI within 3x on 10k (2.9x), not on 100k (3.1x); the service over its parts 1.25, 1.62.
    assert verdicts[2:] == ["**met**", "**not met**", "**met**", "**not met**"]
    only_lite = {"stacks": results["stacks"][:1]}
    assert perf._target_rows(only_lite)[1][2] == "not measured"


def test_report_renders_every_section() -> None:
    stack = _stack(10_000, "lite", p95=24, plain=10, thi=29)
    stack["stages"] = {
        "plain": {"requests": 100, "stages": {"text_encode": {"calls": 100, "mean_ms": 3.0}}}
    }
    stack["stages_seq"] = {
        "plain": {"requests": 10, "stages": {"gallery_search": {"calls": 10, "mean_ms": 7.25}}}
    }
    stack["rss_mb"] = {"tritonserver": 44.0, "icl serve (+ Milvus Lite)": 280.0}
    results = {
        "date": "2026-01-01 00:00 UTC",
        "duration_s": 600,
        "machine": {
            "cpu": "CPU",
            "cores": "2",
            "ram_gib": "24",
            "python": "3.11",
            "load_start": "1.0",
            "milvus": "2.3.5",
            "milvus-lite": "3.2.2",
            "pymilvus": "3.0.2",
            "locust": "2.47.0",
        },
        "settings": {
            "modes": ["plain"],
            "users": [1, 2],
            "step_s": 15,
            "seq_queries": 10,
            "demo_images": 300,
            "query_count": 100,
        },
        "stacks": [stack],
    }
    text = perf.render_report(results, {"Latency": "performance/performance-latency.png"})
    assert "| plain | 2 | 100 | 0 | 90.0 | 12 | 24 | 36 |" in text
    assert "- plain: no knee up to 2 users" in text
    load = text.index("| plain, under load, Locust: stage |")
    single = text.index("| plain, single user: stage |")
    assert text.index("| text_encode | 3.0 (1.00) |") > load > text.index("| gallery_search | 7.2")
    assert single < load
    assert "| icl serve (+ Milvus Lite) | 280 |" in text
    assert "![Latency](performance/performance-latency.png)" in text
