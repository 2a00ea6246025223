"""`icl gallery verify` on a real Milvus Lite data dir (the command group is self-contained;
the CLI package adds it with register())."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from icl.cli.gallery import register
from tests.test_gallery_backends import Backend, _duplicates_beside_distinct, _old_hnsw_collection


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """icl"""

    register(app)
    return app


def test_verify_exit_codes_and_output(tmp_path, monkeypatch):
    backend = Backend("lite", tmp_path, None)
    _, records = _duplicates_beside_distinct(60, 400)
    g = _old_hnsw_collection(backend)
    g.upsert(records)
    g.close()
    runner = CliRunner()
    monkeypatch.setenv("ICL_MILVUS_TOKEN", "secret-token-123")
    args = ["gallery", "verify", "--milvus-uri", backend.uri, "--sample", "0"]

    missing = runner.invoke(_app(), [*args, "--collection", "nope"])
    assert missing.exit_code == 2, missing.output
    assert "no collection 'nope'" in missing.output

    old = runner.invoke(_app(), [*args, "--collection", backend.collection])
    assert old.exit_code == 1, old.output
    assert "rows 460, sampled 460" in old.output and "unreachable: " in old.output

    backend.open().close()  # the service's open rebuilds the index as FLAT
    fixed = runner.invoke(_app(), [*args, "--collection", backend.collection, "--k", "5"])
    assert fixed.exit_code == 0, fixed.output
    assert "rows 460, sampled 460, recall@5 1.000, unreachable 0" in fixed.output
    for result in (missing, old, fixed):
        assert "secret-token-123" not in result.output
