"""Export the two towers of a dual encoder to ONNX and check them against torch.

Tensor names and dtypes are part of the serving contract and are the same in every flavour
(fp32 and fp16 graphs alike):
text tower `input_ids` (int64 [B, L]) -> `embedding` (fp32 [B, D]);
image tower `pixels` (uint8 [B, H, W, 3]) -> `embedding` (fp32 [B, D]).

The fp16 variant (for TensorRT's strongly typed builds) keeps fp32/uint8/int64 IO and stores
weights and activations in fp16; it is checked with onnxruntime on the CPU, which runs fp16
nodes (natively, or by inserting casts around nodes without an fp16 kernel), so every fp16
value is rounded as it would be on the GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from icl.models.config import ModelConfig
from icl.models.dual_encoder import DualEncoder
from icl.onnx_encoders import onnx_session

OPSET = 17
MIN_COSINE_FP32 = 0.9999
MIN_COSINE_FP16 = 0.999
PARITY_TEXTS = (
    "a woman in a red coat carrying a black backpack",
    "The man wears a white short-sleeved shirt, blue jeans and black shoes.",
    "young person with long brown hair",
)
# Ops kept in fp32 in the fp16 variant: onnxruntime's default list (index and control ops)
# plus the final L2 normalisation, whose sum of squares over 1-2k dims is where fp16 loses
# the most (it is cheap in fp32).
FP32_OPS = ("ReduceL2",)


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model closely enough."""


class GraphContractError(ValueError):
    """An exported graph breaks a rule a serving runtime relies on (names, dtypes, casts)."""


@dataclass(frozen=True)
class ParityReport:
    tower: str
    min_cosine: float
    max_abs_diff: float
    precision: str = "fp32"


def parity_inputs(cfg: ModelConfig, images: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of real captions and rendered pedestrian crops at the model's input size.

    Real inputs (not noise) because parity on noise can hide saturation or attention
    patterns that only real images produce.
    """
    from icl.models.pretrained import tokenizer_for
    from icl.synthetic.captions import caption
    from icl.synthetic.render import render
    from icl.synthetic.schema import sample_person

    rng = np.random.default_rng(0)
    people = [sample_person(rng, i) for i in range(images)]
    texts = [*PARITY_TEXTS, *(caption(p, rng) for p in people[:2])]
    pixels = np.stack([render(p, rng, cfg.image_size) for p in people])
    return tokenizer_for(cfg)(texts), pixels


def _cast_uint8_inputs_first(model: onnx.ModelProto) -> None:
    """Make every uint8 graph input feed only Cast nodes (moving a Transpose behind the Cast).

    TensorRT accepts uint8 network inputs only when they go straight into a cast layer
    (NVIDIA/TensorRT#3985); torch exports permute-then-cast for the image branch. The swap
    changes no value: a transpose commutes with an elementwise cast.
    """
    g = model.graph
    for inp in g.input:
        if inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            continue
        consumers = [n for n in g.node if inp.name in n.input]
        for node in consumers:
            if node.op_type == "Cast":
                continue
            after = [n for n in g.node if node.op_type == "Transpose" and node.output[0] in n.input]
            if len(after) != 1 or after[0].op_type != "Cast":
                raise GraphContractError(
                    f"uint8 input {inp.name} feeds {node.op_type} {node.name!r}; TensorRT needs "
                    "uint8 inputs to go straight into a Cast"
                )
            cast = after[0]
            cast_out, transposed = cast.output[0], node.output[0]
            cast.input[0], cast.output[0] = inp.name, f"{inp.name}_as_float"
            node.input[0], node.output[0] = cast.output[0], cast_out
            del transposed
            # Keep the node list topologically sorted: the Cast now runs first.
            nodes = [n for n in g.node if n is not cast]
            nodes.insert(list(g.node).index(node), cast)
            del g.node[:]
            g.node.extend(nodes)


def check_graph_contract(path: Path) -> None:
    """Raise GraphContractError unless the graph has the served names, dtypes and casts."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    expected_in = {"input_ids": onnx.TensorProto.INT64, "pixels": onnx.TensorProto.UINT8}
    if len(g.input) != 1 or g.input[0].name not in expected_in:
        raise GraphContractError(f"{path}: inputs {[i.name for i in g.input]}")
    inp = g.input[0]
    if inp.type.tensor_type.elem_type != expected_in[inp.name]:
        raise GraphContractError(f"{path}: {inp.name} has the wrong dtype")
    if [o.name for o in g.output] != ["embedding"] or (
        g.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT
    ):
        raise GraphContractError(f"{path}: the only output must be fp32 `embedding`")
    if inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
        bad = [n.op_type for n in g.node if inp.name in n.input and n.op_type != "Cast"]
        if bad:
            raise GraphContractError(f"{path}: uint8 input feeds {bad}, not only Cast")


def _export(module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter at opset 17 is the one TensorRT parsers handle best; its
    # deprecation notice is not actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _torch_export(module, example, input_name, path)
    model = onnx.load(str(path))
    _cast_uint8_inputs_first(model)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    check_graph_contract(path)


def _torch_export(
    module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path
) -> None:
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=["embedding"],
        dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def _parity(
    tower: str,
    module: torch.nn.Module,
    path: Path,
    inputs: np.ndarray,
    name: str,
    min_cosine: float = MIN_COSINE_FP32,
    precision: str = "fp32",
) -> ParityReport:
    with torch.no_grad():
        ref = module(torch.from_numpy(inputs)).numpy()
    got = onnx_session(path).run(["embedding"], {name: inputs})[0]
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    report = ParityReport(tower, float(cos.min()), float(np.abs(ref - got).max()), precision)
    if not report.min_cosine >= min_cosine:  # `not >=` so that NaN fails too
        raise ParityError(
            f"{tower} {precision} ONNX export at {path} differs from torch: min cosine "
            f"{report.min_cosine:.6f} < {min_cosine} (max abs diff {report.max_abs_diff:.2e})"
        )
    return report


def export_dual_encoder(
    model: DualEncoder, text_path: Path, image_path: Path
) -> list[ParityReport]:
    """Write both towers to ONNX, validate them with onnx.checker and check parity."""
    model = model.eval()
    ids, pixels = parity_inputs(model.config)
    _export(model.text, torch.from_numpy(ids[:2]), "input_ids", text_path)
    _export(model.image, torch.from_numpy(pixels[:2]), "pixels", image_path)
    return [
        _parity("text", model.text, text_path, ids, "input_ids"),
        _parity("image", model.image, image_path, pixels, "pixels"),
    ]


def _topological_sort(graph: onnx.GraphProto) -> None:
    """onnxruntime's converter appends the casts it inserts; the checker wants sorted nodes."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise GraphContractError(f"graph {graph.name} has a cycle or a dangling input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def convert_to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations, fp32/uint8/int64 IO kept (the serving contract)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(src)),
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
    )
    _topological_sort(model.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    check_graph_contract(dst)


def export_fp16_variants(
    model: DualEncoder, fp32: tuple[Path, Path], fp16: tuple[Path, Path]
) -> list[ParityReport]:
    """Convert the (text, image) fp32 graphs to fp16 and check them against torch fp32."""
    model = model.eval()
    ids, pixels = parity_inputs(model.config)
    reports = []
    for tower, module, src, dst, x, name in (
        ("text", model.text, fp32[0], fp16[0], ids, "input_ids"),
        ("image", model.image, fp32[1], fp16[1], pixels, "pixels"),
    ):
        convert_to_fp16(src, dst)
        reports.append(_parity(tower, module, dst, x, name, MIN_COSINE_FP16, "fp16"))
    return reports
