"""Builders shared by tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from icl.orchestrator.client import timestamp
from icl.orchestrator.tritonserver import TritonServer
from icl.reid.v1 import person_search_pb2 as pb
from icl.synthetic.demo_gallery import DemoImage


def gallery_images(demo: Iterable[DemoImage]) -> list[pb.GalleryImage]:
    return [
        pb.GalleryImage(
            image_id=d.image_id,
            camera_id=d.camera_id,
            captured_at=timestamp(d.captured_at_ms),
            track_id=d.track_id,
            image_uri=f"demo://{d.image_id}.png",
            image=d.png,
        )
        for d in demo
    ]


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
