"""The demo models: configs and small weights trained by the project on the synthetic world.

`dual_encoder.toml` is the run config of `icl train`; `dual_encoder.pt` the weights it
produced (fp16, selected on val). docs/models.md says how to rebuild them and what they score.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_CONFIG = "dual_encoder.toml"
DEMO_WEIGHTS = "dual_encoder.pt"


def demo_path(name: str) -> Path:
    return Path(str(resources.files("icl.demo").joinpath(name)))
