"""The committed gRPC stubs are exactly what the pinned grpcio-tools makes of the proto."""

from pathlib import Path

from icl.orchestrator.generate_stubs import generate

ROOT = Path(__file__).parents[1]


def test_committed_stubs_are_fresh(tmp_path):
    generate(tmp_path)
    for name in ("person_search_pb2.py", "person_search_pb2.pyi", "person_search_pb2_grpc.py"):
        fresh = (tmp_path / "icl/reid/v1" / name).read_text()
        committed = (ROOT / "icl/reid/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run python -m icl.orchestrator.generate_stubs"
