"""ICL person search: the ML core (models, tokenisation, data, metrics, THI, RDA).

Importable without any server. The serving parts live in `icl.orchestrator` (folder
`orchestrator/`), `icl.export` (folder `export/`) and the Triton models in
`icl.model_repository` (folder `model_repository/`).
"""

__version__ = "0.1.0"
