"""Start-up code shared by the python-backend models in model_repository/.

Loads the ONNX graph named in config.pbtxt and refuses to start when the shapes in the config
disagree with the graph, so a wrong config fails at load time with the model's name, not at
the first request. Also the parameter reading and the text decoding the models share.

Tensor configs are read with the python backend's own utilities
(`triton_python_backend_utils.get_input_config_by_name` / `get_output_config_by_name`),
which exist only inside Triton's python-backend stub, so they are imported where used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort


class ModelConfigError(ValueError):
    pass


def model_config(args: dict[str, str]) -> dict[str, Any]:
    """The model's config as Triton passes it to initialize(): config.pbtxt as JSON."""
    return json.loads(args["model_config"])


def model_parameters(config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt's `parameters` as {key: value}.

    Triton hands them over as {"key": {"string_value": "..."}}; the python backend's
    utilities have no reader for them.
    """
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _tensor_config(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    import triton_python_backend_utils as pb_utils  # only inside the python-backend stub

    found = pb_utils.get_input_config_by_name(config, name)
    return found if found is not None else pb_utils.get_output_config_by_name(config, name)


def _dims(tensor: Any) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in tensor.shape[1:]]  # drop the batch axis


def load_onnx_session(args: dict[str, str], tensor_map: dict[str, str]) -> ort.InferenceSession:
    """`args` as Triton passes them to initialize(); `tensor_map` maps config names to graph names.

    The config's dims for each mapped tensor must equal the graph's (BYTES text inputs are
    checked by the model itself, since tokenisation changes their shape).
    """
    from icl.onnx_encoders import onnx_session  # onnxruntime: only the models that need it

    config = model_config(args)
    params = model_parameters(config)
    path = (
        Path(args["model_repository"])
        / args["model_version"]
        / params.get("onnx_file", "model.onnx")
    )
    name = config["name"]
    if not path.is_file():
        raise ModelConfigError(f"model {name}: ONNX file {path} is missing")
    try:
        session = onnx_session(path, int(params.get("intra_op_threads", "1")))
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelConfigError(f"model {name}: cannot load {path}: {exc}") from None
    graph = {t.name: t for t in [*session.get_inputs(), *session.get_outputs()]}
    for config_name, graph_name in tensor_map.items():
        tensor = _tensor_config(config, config_name)
        if tensor is None:
            continue
        want = [int(d) for d in tensor["dims"]]
        have = _dims(graph[graph_name])
        if len(want) != len(have) or any(
            h not in (-1, w) for w, h in zip(want, have, strict=False)
        ):
            raise ModelConfigError(
                f"model {name}: config.pbtxt gives {config_name} dims {want}, but {path.name} "
                f"has {graph_name} dims {have}"
            )
    return session


def output_dims(args: dict[str, str], name: str) -> list[int]:
    """The dims (without the batch axis) that config.pbtxt gives output `name`."""
    import triton_python_backend_utils as pb_utils  # only inside the python-backend stub

    config = model_config(args)
    tensor = pb_utils.get_output_config_by_name(config, name)
    if tensor is None:
        raise ModelConfigError(f"model {config['name']}: config.pbtxt has no output {name}")
    return [int(d) for d in tensor["dims"]]


def decode_texts(raw: np.ndarray) -> tuple[list[str], str | None]:
    """A BYTES tensor's items as str; (texts, None) or ([], a message for the client)."""
    try:
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw], None
    except UnicodeDecodeError as exc:
        return [], f"TEXT is not valid UTF-8: {exc}"
