"""`icl enroll DIR|JSON` against real orchestrator processes (Triton + Milvus Lite)."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import typer
from typer.testing import CliRunner

from icl.cli.enroll import register
from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import gallery_images, start_orchestrator

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def noop() -> None:  # a second command keeps `enroll` a subcommand, as in icl.cli
        pass

    return app


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    demo = list(demo_gallery(12, seed=21))
    for d in demo:
        folder = root / d.camera_id
        folder.mkdir(exist_ok=True)
        (folder / f"{d.image_id}.png").write_bytes(d.png)
    (root / "cam-01").mkdir(exist_ok=True)
    (root / "cam-01" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root, demo


def _ids(running, top_k: int = 1000) -> list[str]:
    with running.channel() as channel:
        reply = pb_grpc.PersonSearchStub(channel).Search(
            search_request("a person", top_k=top_k), timeout=30
        )
    return [h.image_id for h in reply.hits]


def test_enroll_directory_twice_is_idempotent(app, orchestrator, crops):
    root, demo = crops
    for _ in range(2):
        result = runner.invoke(app, ["enroll", str(root), "--address", orchestrator.address, "-q"])
        assert result.exit_code == 1, result.output  # one crop is rejected
        assert "enrolled 12, rejected 1 of 13" in result.output
        assert "rejected cam-01/broken" in result.output
    ids = _ids(orchestrator)
    assert sorted(i for i in ids if "/" in i) == sorted(f"{d.camera_id}/{d.image_id}" for d in demo)
    assert len(ids) == len(set(ids))


def test_enroll_json_manifest(app, orchestrator, crops, tmp_path):
    root, demo = crops
    rows = [
        {
            "image_id": f"m-{d.image_id}",
            "camera_id": d.camera_id,
            "captured_at": "2026-01-05T09:30:00" if i % 2 else d.captured_at_ms,
            "path": str(root / d.camera_id / f"{d.image_id}.png"),
            "track_id": d.track_id,
            "image_uri": f"s3://crops/{d.image_id}.png",
        }
        for i, d in enumerate(demo[:4])
    ]
    manifest = tmp_path / "crops.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    result = runner.invoke(app, ["enroll", str(manifest), "--address", orchestrator.address])
    assert result.exit_code == 0, result.output
    assert "enrolled 4, rejected 0 of 4" in result.output
    assert {f"m-{d.image_id}" for d in demo[:4]} <= set(_ids(orchestrator))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json", "not JSON"),
        ('[{"image_id": "a"}]', "missing camera_id, captured_at, path"),
        (
            '[{"image_id": "a", "camera_id": "c", "captured_at": "noon", "path": "x.png"}]',
            "is not ISO-8601",
        ),
    ],
)
def test_bad_manifests_fail_in_one_line(app, tmp_path, content, words):
    manifest = tmp_path / "m.json"
    manifest.write_text(content)
    result = runner.invoke(app, ["enroll", str(manifest), "--address", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert words in result.output
    assert "Traceback" not in result.output


def test_missing_source_and_unreachable_service(app, crops, tmp_path):
    result = runner.invoke(app, ["enroll", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "neither a directory nor a JSON file" in result.output
    result = runner.invoke(
        app, ["enroll", str(crops[0]), "--address", "127.0.0.1:1", "-q", "--timeout", "5"]
    )
    assert result.exit_code == 2
    # Checked before the load: nothing was sent, so there is nothing to resume.
    assert "UNAVAILABLE: cannot connect to the PersonSearch service at 127.0.0.1:1" in (
        result.output
    )


def test_interrupted_enrolment_rerun_loses_and_duplicates_nothing(app, triton, tmp_path):
    images = gallery_images(demo_gallery(48, seed=33))
    root = tmp_path / "crops"
    for item in images:
        (root / item.camera_id).mkdir(parents=True, exist_ok=True)
        (root / item.camera_id / f"{item.image_id}.png").write_bytes(item.image)
        item.image_id = f"{item.camera_id}/{item.image_id}"  # the id the CLI gives the file
    db = tmp_path / "gallery.db"
    first = start_orchestrator(triton.grpc_url, db, tmp_path / "a.log")
    acked: list[str] = []
    killed = threading.Event()

    def batches():
        for i in range(0, len(images), 8):
            if killed.wait(0.0 if len(acked) < 16 else 30):
                return
            yield pb.EnrollRequest(images=images[i : i + 8])

    try:
        with first.channel() as channel, pytest.raises(grpc.RpcError):
            for response in pb_grpc.PersonSearchStub(channel).Enroll(batches(), timeout=60):
                acked += [r.image_id for r in response.results]
                if len(acked) >= 16:
                    first.process.kill()  # the service dies mid-stream
                    first.process.wait()
                    killed.set()
    finally:
        killed.set()
        first.stop()
    assert 16 <= len(acked) < 48
    second = start_orchestrator(triton.grpc_url, db, tmp_path / "b.log")
    try:
        assert set(acked) <= set(_ids(second))  # nothing acknowledged was lost
        result = runner.invoke(app, ["enroll", str(root), "--address", second.address, "-q"])
        assert result.exit_code == 0, result.output
        ids = _ids(second)
        assert len(ids) == len(set(ids)) == 48  # and the re-run duplicated nothing
        assert set(ids) == {i.image_id for i in images}
    finally:
        second.stop()


def test_enroll_reports_a_service_that_went_away_and_resumes(tmp_path, triton):
    """SIGKILL the service in the middle of `icl enroll`: the CLI says UNAVAILABLE and how to
    resume (not gRPC's "INTERNAL: Internal error from Core"), and running the same command
    against the restarted service stores every crop, none twice."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "crops" / "cam-01"
    root.mkdir(parents=True)
    demo = list(demo_gallery(600, seed=23))
    for d in demo:
        (root / f"{d.image_id}.png").write_bytes(d.png)
    gallery = tmp_path / "gallery.db"
    service = start_orchestrator(triton.grpc_url, gallery, tmp_path / "serve.log")
    cmd = [sys.executable, "-m", "icl.cli", "enroll", str(root.parent), "--batch-size", "4"]
    try:
        load = subprocess.Popen(
            [*cmd, "--address", service.address, "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while len(_ids(service)) < 40 and time.monotonic() < deadline:  # mid-load
            time.sleep(0.2)
        service.process.send_signal(signal.SIGKILL)
        service.process.wait()
        _, stderr = load.communicate(timeout=60)
    finally:
        service.stop()
    message = " ".join(stderr.split())
    assert load.returncode == 2, message
    assert "UNAVAILABLE" in message and "went away" in message, message
    assert "INTERNAL" not in message.split("(")[0], message
    assert "run the same command again" in message, message

    service = start_orchestrator(triton.grpc_url, gallery, tmp_path / "serve.log")
    try:
        again = subprocess.run(
            [*cmd, "--address", service.address, "-q"], capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stderr
        assert f"enrolled {len(demo)}, rejected 0 of {len(demo)}" in again.stdout
        ids = _ids(service)
        assert sorted(ids) == sorted(f"cam-01/{d.image_id}" for d in demo)
    finally:
        service.stop()
