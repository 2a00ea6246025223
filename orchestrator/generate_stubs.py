"""Regenerate the Python stubs of the gRPC API with the pinned grpcio-tools.

    python -m icl.orchestrator.generate_stubs

Writes icl/reid/v1/person_search_pb2{,_grpc}.py{,i}; tests/test_api_stubs.py fails when the
committed stubs and the proto disagree.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO = "icl/reid/v1/person_search.proto"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    proto_root = Path(__file__).parent / "proto"
    include = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_root / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_root / PROTO}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1])
