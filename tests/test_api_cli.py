"""The `icl` command's API v1 options against the running stack (tritonserver with the demo
MLLM, `icl serve`, Milvus Lite): query by example, confirmed anchors, streamed THI steps,
track grouping, `icl gallery list|show|stats`, and one-line errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb, pb_grpc
from tests.helpers import enroll_all, gallery_images, start_orchestrator
from tests.test_cli import icl

TEXT = "a woman in a red top"


@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("api_cli")
    running = start_orchestrator(
        triton.grpc_url, work / "gallery.db", work / "serve.log", ICL_MLLM_MODEL="mllm"
    )
    demo = list(demo_gallery(12, seed=8))
    with running.channel() as channel:
        results = enroll_all(pb_grpc.PersonSearchStub(channel), gallery_images(demo))
    assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
    crop = work / "crop.png"
    crop.write_bytes(demo[3].png)
    yield running.address, demo, crop
    running.stop()


def rows(stdout: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in stdout.splitlines()
        if line.strip().startswith("│")
    ]


def test_search_by_image_and_by_text_and_image(stack):
    address, demo, crop = stack
    out = icl("search", "--address", address, "--image", str(crop), "-k", "3")
    assert out.returncode == 0, out.stderr
    assert rows(out.stdout)[0][1] == demo[3].image_id
    out = icl(
        "search", "--address", address, "-t", TEXT, "--image", str(crop), "--image-weight", "0.8"
    )
    assert out.returncode == 0, out.stderr
    assert rows(out.stdout)[0][1] == demo[3].image_id


def test_stream_prints_each_step_then_the_table(stack):
    address, _, _ = stack
    out = icl("search", "--address", address, "-t", TEXT, "--thi", "--xi", "1", "--stream")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("base ranking:")
    assert any(line.startswith("THI asked #1 ") for line in lines)
    assert len(rows(out.stdout)) == 10


def test_confirmed_anchor_streamed(stack):
    address, demo, _ = stack
    anchor = demo[5].image_id
    out = icl("search", "--address", address, "-t", TEXT, "--anchor", anchor, "--stream")
    assert out.returncode == 0, out.stderr
    assert f"THI anchor: {anchor} (confirmed by the operator)" in out.stdout
    assert "THI refined query: " in out.stdout
    assert not any(line.startswith("THI asked #") for line in out.stdout.splitlines())
    assert f"THI anchor: {anchor} (confirmed); refined query:" in out.stdout


def test_group_tracks_adds_the_track_columns(stack):
    address, _, _ = stack
    out = icl("search", "--address", address, "-t", TEXT, "--group-tracks", "-k", "50")
    assert out.returncode == 0, out.stderr
    table = rows(out.stdout)
    tracks = [row[5] for row in table]
    assert len(tracks) == len(set(tracks)) and all(int(row[6]) >= 1 for row in table)


def test_gallery_list_show_stats(stack, tmp_path: Path):
    address, demo, _ = stack
    out = icl("gallery", "list", "--address", address, "--page-size", "5", "--all")
    assert out.returncode == 0, out.stderr
    assert [row[0] for row in rows(out.stdout)] == sorted(d.image_id for d in demo)
    out = icl("gallery", "list", "--address", address, "--page-size", "5")
    assert len(rows(out.stdout)) == 5 and "next page: --page-token " in out.stdout
    token = out.stdout.split("--page-token ")[1].split()[0]
    out = icl("gallery", "list", "--address", address, "--page-size", "5", "--page-token", token)
    assert [row[0] for row in rows(out.stdout)] == sorted(d.image_id for d in demo)[5:10]
    crop = tmp_path / "out.png"
    out = icl("gallery", "show", demo[2].image_id, "--address", address, "--out", str(crop))
    assert out.returncode == 0, out.stderr
    assert crop.read_bytes() == demo[2].png and demo[2].camera_id in out.stdout
    out = icl("gallery", "stats", "--address", address)
    assert out.returncode == 0, out.stderr
    assert "images: 12" in out.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["search", "-t", TEXT, "--anchor", "never-enrolled"], "NOT_FOUND"),
        (["search", "-t", TEXT, "--anchor", "bad id"], "INVALID_ARGUMENT"),
        (["search", "--image", "{not_image}"], "INVALID_ARGUMENT: image"),
        (["search", "--image", "{crop}", "--thi"], "FAILED_PRECONDITION"),
        (["search", "-t", TEXT, "--image", "{crop}", "--image-weight", "2"], "INVALID_ARGUMENT"),
        (["search", "-t", TEXT, "--thi", "--lambda", "nan"], "INVALID_ARGUMENT"),
        (["search"], "INVALID_ARGUMENT: text is empty"),
        (["gallery", "show", "never-enrolled"], "NOT_FOUND"),
        (["gallery", "list", "--page-token", "forged"], "INVALID_ARGUMENT: page_token"),
        (["gallery", "list", "--page-size", "0"], "INVALID_ARGUMENT: page_size"),
    ],
)
def test_errors_are_one_line_with_the_code(stack, tmp_path: Path, args, words):
    address, _, crop = stack
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    args = [a.format(crop=crop, not_image=not_image) for a in args]
    out = icl(*args, "--address", address)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert words in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
