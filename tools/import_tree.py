"""Lay the source folders out as their import names, for static tools.

pyproject.toml maps folders onto import names (`orchestrator/` is `icl.orchestrator`, `api/`
is `icl_api`, ...). Python follows that through the editable install's import hook; mypy and
import-linter read the file system instead. This writes a tree of real folders and symlinked
files (like setuptools' strict editable mode) where each module sits at its import path:

    python tools/import_tree.py .typecheck
    PYTHONPATH=.typecheck lint-imports
    MYPYPATH=.typecheck mypy -p icl_api ...
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """The folder holding `package`, following the longest mapped prefix."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[n:])
    return ROOT / Path(*parts)


def build(out: Path) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = config.get("package-dir", {})
    if out.exists():
        shutil.rmtree(out)
    for package in config["packages"]:
        source = folder_of(package, package_dir)
        target = out / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(source.iterdir()):
            if file.suffix in (".py", ".pyi") or file.name == "py.typed":
                (target / file.name).symlink_to(file)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".typecheck")
