"""The committed gRPC stubs are exactly what the pinned grpcio-tools makes of the proto."""

import pytest

from icl_api.generate import STUB_DIR, STUBS, generate


@pytest.mark.unit
def test_committed_stubs_are_fresh(tmp_path):
    generate(tmp_path)
    for name in STUBS:
        fresh = (tmp_path / name).read_text()
        committed = (STUB_DIR / name).read_text()
        assert fresh == committed, f"{name} is stale: run python -m icl_api.generate"
