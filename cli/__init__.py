"""`icl`: one command, one module per command group, registered here and nowhere else."""

from __future__ import annotations

import typer

from icl.cli import console, demo, enroll, export, gallery, ml, rda, search, serving

app = typer.Typer(
    help="Text-to-image person search (ICL) on Triton and Milvus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for group in (export, serving, demo, search, ml, enroll, gallery, rda, console):
    group.register(app)
