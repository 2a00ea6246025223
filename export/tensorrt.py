"""TensorRT plan builds for the GPU flavour: trtexec commands, the build script, detection.

TensorRT cannot be installed on the project's machines (docs/export.md), so the GPU export
writes the fp16 ONNX graphs and a `build_plans.sh` that runs `trtexec` where it exists (the
NGC TensorRT image with the same YY.MM tag as the Triton image that serves the plans: plans
are tied to the TensorRT version and the GPU). Builds are strongly typed: the precision is
the ONNX graph's, which is how TensorRT 11 works and what TensorRT 10 offers with
`--stronglyTyped`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = "build_plans.sh"
TIMING_CACHE = "timing.cache"
# Where NVIDIA's images put trtexec when it is not on PATH.
TRTEXEC_FALLBACKS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")


class TensorRTUnavailable(RuntimeError):
    """No trtexec here: the plans must be built where TensorRT and a GPU exist."""


class PlanBuildError(RuntimeError):
    """trtexec ran and failed; the message carries the tail of its output."""


@dataclass(frozen=True)
class PlanBuild:
    """One engine: ONNX in, plan out, one optimisation profile over the batch axis."""

    onnx: str  # relative to the repository root
    plan: str
    input_name: str
    item_shape: tuple[int, ...]  # without the batch axis
    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def shape(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in (batch, *self.item_shape))

    def trtexec_args(self, timing_cache: str = TIMING_CACHE) -> list[str]:
        return [
            f"--onnx={self.onnx}",
            f"--saveEngine={self.plan}",
            "--stronglyTyped",  # precision comes from the graph (fp16 in, fp16 compute)
            f"--minShapes={self.shape(self.min_batch)}",
            f"--optShapes={self.shape(self.opt_batch)}",
            f"--maxShapes={self.shape(self.max_batch)}",
            f"--timingCacheFile={timing_cache}",  # reused across builds and rebuilds
            "--skipInference",
        ]


def render_build_script(builds: list[PlanBuild], serving_image: str) -> str:
    """A POSIX sh script that builds every plan from the repository root it sits in."""
    lines = [
        "#!/bin/sh",
        "# Builds the TensorRT plans of this model repository (written by `icl export",
        "# --flavour gpu`). Run it on the serving GPU with the TensorRT release of the serving",
        f"# image {serving_image}, e.g. in the TensorRT image of the same YY.MM:",
        '#   docker run --rm --gpus all -v "$PWD":/repo -w /repo \\',
        "#     nvcr.io/nvidia/tensorrt:<YY.MM>-py3 sh build_plans.sh",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || true)}"',
        *(f'[ -n "$TRTEXEC" ] || [ ! -x {p} ] || TRTEXEC={p}' for p in TRTEXEC_FALLBACKS),
        'if [ -z "$TRTEXEC" ]; then',
        '  echo "build_plans.sh: trtexec not found; run this inside a TensorRT image" >&2',
        "  exit 3",
        "fi",
    ]
    for b in builds:
        args = " \\\n  ".join(shlex.quote(a) for a in b.trtexec_args())
        lines += [f'echo "building {b.plan}"', f'"$TRTEXEC" \\\n  {args}']
    lines.append('echo "all plans built"')
    return "\n".join(lines) + "\n"


def find_trtexec() -> str | None:
    """The trtexec to use: $TRTEXEC, then PATH, then NVIDIA's usual install folders."""
    candidates = [os.environ.get("TRTEXEC"), shutil.which("trtexec"), *TRTEXEC_FALLBACKS]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def require_trtexec() -> str:
    found = find_trtexec()
    if found is None:
        raise TensorRTUnavailable(
            "TensorRT's trtexec is not installed here (TensorRT cannot be installed on this "
            "machine); export with --plans auto or skip, then run build_plans.sh inside a "
            "TensorRT image on the serving GPU"
        )
    return found


def run_build_script(repo: Path, timeout_s: float = 3600.0) -> None:
    """Run `build_plans.sh` in `repo` with the trtexec found here."""
    trtexec = require_trtexec()
    proc = subprocess.run(
        ["sh", str(repo / BUILD_SCRIPT)],
        env={**os.environ, "TRTEXEC": trtexec},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise PlanBuildError(f"{repo / BUILD_SCRIPT} failed (exit {proc.returncode}): {tail}")
