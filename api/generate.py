"""Regenerate the Python stubs of the gRPC API with the pinned grpcio-tools.

    python -m icl_api.generate

protoc names imports after the proto's path (`icl/reid/v1/...`, the wire package); the stubs
live in this package (`icl_api.v1`), so the two generated import lines are re-pointed.
tests/test_api_stubs.py fails when the committed stubs and the proto disagree.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO = "icl/reid/v1/person_search.proto"
PROTO_ROOT = Path(__file__).parent / "proto"
STUB_DIR = Path(__file__).parent / "v1"
STUBS = ("person_search_pb2.py", "person_search_pb2.pyi", "person_search_pb2_grpc.py")
_GENERATED_MODULE = "icl.reid.v1"
_STUB_MODULE = "icl_api.v1"


def _repoint(text: str) -> str:
    return text.replace(f"from {_GENERATED_MODULE} import", f"from {_STUB_MODULE} import").replace(
        f"'{_GENERATED_MODULE}.person_search_pb2'", f"'{_STUB_MODULE}.person_search_pb2'"
    )


def generate(out_dir: Path) -> None:
    """Write the three stub files into `out_dir`."""
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            str(PROTO_ROOT / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in STUBS:
            text = (Path(raw) / Path(PROTO).parent / name).read_text()
            (out_dir / name).write_text(_repoint(text))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else STUB_DIR)
