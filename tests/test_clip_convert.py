"""CLIP towers and the OpenAI-CLIP / RDE / IRRA checkpoint converters.

Real weights cannot be downloaded here: the checkpoints are random tensors with the real key
names and shapes (full ViT-B/16 size once, scaled-down copies elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icl.models.clip import resize_position_embedding
from icl.models.config import ClipTextTower, ClipVisionTower, ModelConfig, TseConfig, vit_b16_config
from icl.models.convert import ConversionError, convert_checkpoint, convert_to_file
from icl.models.dual_encoder import DualEncoder, load_checkpoint, save_checkpoint
from icl.text.tokenizer import EOT_ID, SOT_ID, VOCAB_SIZE

IGNORED = ("logit_scale", "input_resolution", "context_length", "vocab_size")
IRRA_EXTRAS = (
    "classifier",
    "cross_attn",
    "cross_modal_transformer",
    "ln_pre_t",
    "ln_pre_i",
    "ln_post",
    "mlm_head",
)


def _block(prefix: str, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        f"{prefix}.attn.in_proj_weight": r(3 * width, width),
        f"{prefix}.attn.in_proj_bias": r(3 * width),
        f"{prefix}.attn.out_proj.weight": r(width, width),
        f"{prefix}.attn.out_proj.bias": r(width),
        f"{prefix}.ln_1.weight": r(width),
        f"{prefix}.ln_1.bias": r(width),
        f"{prefix}.mlp.c_fc.weight": r(4 * width, width),
        f"{prefix}.mlp.c_fc.bias": r(4 * width),
        f"{prefix}.mlp.c_proj.weight": r(width, 4 * width),
        f"{prefix}.mlp.c_proj.bias": r(width),
        f"{prefix}.ln_2.weight": r(width),
        f"{prefix}.ln_2.bias": r(width),
    }


def openai_state(
    vw: int = 768,
    vl: int = 12,
    tw: int = 512,
    tl: int = 12,
    embed: int = 512,
    patch: int = 16,
    side: int = 14,
    ctx: int = 77,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's state dict: ViT-B/16 by default (`ViT-B-16.pt`'s names and shapes)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    s = {
        "positional_embedding": r(ctx, tw),
        "text_projection": r(tw, embed),
        "logit_scale": torch.tensor(4.6052),
        "visual.class_embedding": r(vw),
        "visual.positional_embedding": r(side * side + 1, vw),
        "visual.proj": r(vw, embed),
        "visual.conv1.weight": r(vw, 3, patch, patch),
        "visual.ln_pre.weight": r(vw),
        "visual.ln_pre.bias": r(vw),
    }
    for i in range(vl):
        s.update(_block(f"visual.transformer.resblocks.{i}", vw, g))
    s["visual.ln_post.weight"] = r(vw)
    s["visual.ln_post.bias"] = r(vw)
    s["token_embedding.weight"] = r(VOCAB_SIZE, tw)
    for i in range(tl):
        s.update(_block(f"transformer.resblocks.{i}", tw, g))
    s["ln_final.weight"] = r(tw)
    s["ln_final.bias"] = r(tw)
    s["input_resolution"] = torch.tensor(patch * side)
    s["context_length"] = torch.tensor(ctx)
    s["vocab_size"] = torch.tensor(VOCAB_SIZE)
    return s


def rde_heads(embed: int = 512, dim: int = 1024, seed: int = 1) -> dict[str, torch.Tensor]:
    """RDE's VisualEmbeddingLayer / TexualEmbeddingLayer (its spelling) state."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in ("visul_emb_layer", "texual_emb_layer"):
        out[f"{name}.linear.weight"] = torch.randn(dim, embed, generator=g)
        out[f"{name}.linear.bias"] = torch.randn(dim, generator=g)
        for i, (a, b) in enumerate([(embed, dim // 2), (dim // 2, dim)]):
            out[f"{name}.mlp.layers.{i}.weight"] = torch.randn(b, a, generator=g)
            out[f"{name}.mlp.layers.{i}.bias"] = torch.randn(b, generator=g)
            out[f"{name}.mlp.bns.{i}.weight"] = torch.randn(b, generator=g)
            out[f"{name}.mlp.bns.{i}.bias"] = torch.randn(b, generator=g)
            out[f"{name}.mlp.bns.{i}.running_mean"] = torch.randn(b, generator=g)
            out[f"{name}.mlp.bns.{i}.running_var"] = torch.rand(b, generator=g) + 0.5
            out[f"{name}.mlp.bns.{i}.num_batches_tracked"] = torch.tensor(7)
    return out


def irra_extras(embed: int = 512, classes: int = 11003) -> dict[str, torch.Tensor]:
    """IRRA's modules beyond CLIP (ID classifier, cross-modal MLM); one block of each kind."""
    g = torch.Generator().manual_seed(2)
    s = {
        "classifier.weight": torch.randn(classes, embed, generator=g),
        "classifier.bias": torch.zeros(classes),
        "cross_attn.in_proj_weight": torch.randn(3 * embed, embed, generator=g),
        "cross_attn.in_proj_bias": torch.zeros(3 * embed),
        "cross_attn.out_proj.weight": torch.randn(embed, embed, generator=g),
        "cross_attn.out_proj.bias": torch.zeros(embed),
        "ln_pre_t.weight": torch.ones(embed),
        "ln_pre_t.bias": torch.zeros(embed),
        "ln_pre_i.weight": torch.ones(embed),
        "ln_pre_i.bias": torch.zeros(embed),
        "ln_post.weight": torch.ones(embed),
        "ln_post.bias": torch.zeros(embed),
        "mlm_head.dense.weight": torch.randn(embed, embed, generator=g),
        "mlm_head.dense.bias": torch.zeros(embed),
        "mlm_head.ln.weight": torch.ones(embed),
        "mlm_head.ln.bias": torch.zeros(embed),
        "mlm_head.fc.weight": torch.randn(VOCAB_SIZE, embed, generator=g),
        "mlm_head.fc.bias": torch.zeros(VOCAB_SIZE),
    }
    s.update(_block("cross_modal_transformer.resblocks.0", embed, g))
    return s


def small_config(context_length: int = 77, tse: bool = True) -> ModelConfig:
    return ModelConfig(
        image_size=(64, 32),
        context_length=context_length,
        embed_dim=32,
        image_tower=ClipVisionTower(width=64, layers=2, heads=2),
        text_tower=ClipTextTower(width=64, layers=2, heads=2),
        tse=TseConfig(enabled=tse, dim=64),
    )


def small_state(**kw: int) -> dict[str, torch.Tensor]:
    args = dict(vw=64, vl=2, tw=64, tl=2, embed=32, side=3) | kw
    return openai_state(**args)


def expected_backbone(src: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Independent statement of the mapping: our key -> the source tensor after its transform."""
    vl, tl = cfg.image_tower.layers, cfg.text_tower.layers
    patch = cfg.image_tower.patch_size
    grid = (cfg.image_size[0] // patch, cfg.image_size[1] // patch)
    out = {
        "image.tower.embeddings.class_embedding": src["visual.class_embedding"],
        "image.tower.embeddings.position_embedding": resize_position_embedding(
            src["visual.positional_embedding"], grid
        ),
        "image.tower.embeddings.patch_embedding.weight": src["visual.conv1.weight"],
        "image.tower.pre_layernorm.weight": src["visual.ln_pre.weight"],
        "image.tower.pre_layernorm.bias": src["visual.ln_pre.bias"],
        "image.tower.post_layernorm.weight": src["visual.ln_post.weight"],
        "image.tower.post_layernorm.bias": src["visual.ln_post.bias"],
        "image.tower.proj.weight": src["visual.proj"].T,
        "text.tower.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text.tower.embeddings.position_embedding.weight": src["positional_embedding"][
            : cfg.context_length
        ],
        "text.tower.final_layer_norm.weight": src["ln_final.weight"],
        "text.tower.final_layer_norm.bias": src["ln_final.bias"],
        "text.tower.proj.weight": src["text_projection"].T,
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1"}
    names |= {"mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    for ours, theirs, layers in (("image", "visual.", vl), ("text", "", tl)):
        for i in range(layers):
            a, b = f"{theirs}transformer.resblocks.{i}.", f"{ours}.tower.encoder.layers.{i}."
            width = src[a + "ln_1.weight"].shape[0]
            for kind in ("weight", "bias"):
                packed = src[a + f"attn.in_proj_{kind}"]
                out[b + f"self_attn.q_proj.{kind}"] = packed[:width]
                out[b + f"self_attn.k_proj.{kind}"] = packed[width : 2 * width]
                out[b + f"self_attn.v_proj.{kind}"] = packed[2 * width :]
                for src_name, our_name in names.items():
                    out[b + f"{our_name}.{kind}"] = src[a + f"{src_name}.{kind}"]
    return out


def _assert_loaded(model: DualEncoder, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value.float()), key


def _tse_keys(model: DualEncoder) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(("image.tse.", "text.tse."))}


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = 3 + 4 * b
        ids[b, 0] = SOT_ID
        ids[b, 1 : n + 1] = torch.randint(300, 40000, (n,), generator=g)
        ids[b, n + 1] = EOT_ID
    return ids


def _pixels(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *size, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- position resizing


def test_resize_keeps_a_constant_table_constant() -> None:
    table = torch.full((1 + 14 * 14, 8), 0.25)
    table[0] = 7.0
    out = resize_position_embedding(table, (24, 8))
    assert out.shape == (1 + 24 * 8, 8)
    assert torch.equal(out[0], table[0])
    torch.testing.assert_close(out[1:], torch.full((192, 8), 0.25))


def test_resize_matches_hand_computed_bilinear() -> None:
    # 2x2 grid [[0, 1], [2, 3]] to 4 rows x 2 columns, align_corners=False: the source row
    # coordinate of output row i is (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped
    # to [0, 1] -> weights 0, 0.25, 0.75, 1 on the second row.
    table = torch.tensor([[9.0], [0.0], [1.0], [2.0], [3.0]])
    out = resize_position_embedding(table, (4, 2))
    expected = torch.tensor([[9.0], [0.0], [1.0], [0.5], [1.5], [1.5], [2.5], [2.0], [3.0]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(resize_position_embedding(table, (2, 2)), table)
    with pytest.raises(ValueError, match="square"):
        resize_position_embedding(torch.zeros(1 + 6, 4), (3, 2))


# ---------------------------------------------------------------- full-size ViT-B/16


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    return openai_state()


def test_openai_clip_full_size(full_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    cfg = vit_b16_config()
    model, report = convert_checkpoint(full_state, cfg)
    assert report.layout == "openai-clip"
    assert set(report.missing) == _tse_keys(model) and report.missing
    assert report.unexpected == ()
    assert set(report.ignored) == set(IGNORED)
    assert "14x14 -> 24x8" in report.summary()

    expected = expected_backbone(full_state, cfg)
    # Every tensor of the model is either from the checkpoint, a TSE head, or the pixel stats.
    assert set(model.state_dict()) == set(expected) | _tse_keys(model) | {"image.mean", "image.std"}
    _assert_loaded(model, expected)
    assert report.loaded == len(expected)
    # Spot checks of the transforms, stated directly.
    st = model.state_dict()
    packed = full_state["visual.transformer.resblocks.11.attn.in_proj_weight"]
    assert torch.equal(
        st["image.tower.encoder.layers.11.self_attn.k_proj.weight"], packed[768:1536]
    )
    assert torch.equal(st["text.tower.proj.weight"], full_state["text_projection"].T)
    assert st["image.tower.embeddings.position_embedding"].shape == (193, 768)

    with torch.no_grad():
        img = model.image(_pixels(2, (384, 128)))
        txt = model.text(_ids(2, 77))
        out = model.image.tower(torch.randn(2, 3, 384, 128))
    assert img.shape == (2, 1536) and txt.shape == (2, 1536)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    assert out.tokens.shape == (2, 192, 512) and out.global_feature.shape == (2, 512)
    assert out.scores.shape == (2, 192) and out.valid.all()
    assert model.image.tse.k == 57 and model.text.tse.k == 22

    # Our own checkpoint format round-trips the converted model.
    path = tmp_path / "converted.pt"
    save_checkpoint(model, path)
    again = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(again.text(_ids(2, 77)), txt)


def test_rde_full_size(full_state: dict[str, torch.Tensor]) -> None:
    heads = rde_heads()
    blob = {"model": {f"base_model.{k}": v for k, v in full_state.items()} | heads}
    blob["optimizer"] = {"state": {}, "param_groups": []}  # other entries of RDE's checkpoint
    model, report = convert_checkpoint(blob)  # default config: the paper's model
    assert model.config == vit_b16_config()
    assert report.layout == "rde"
    assert report.missing == () and report.unexpected == ()
    assert set(report.ignored) == {f"base_model.{k}" for k in IGNORED}
    st = model.state_dict()
    for key, value in heads.items():
        ours = key.replace("visul_emb_layer.", "image.tse.").replace(
            "texual_emb_layer.", "text.tse."
        )
        assert torch.equal(st[ours], value), key
    _assert_loaded(model, expected_backbone(full_state, vit_b16_config()))


# ---------------------------------------------------------------- scaled-down layouts


def test_irra_layout_reports_extras_and_missing_heads() -> None:
    cfg = small_config()
    src = small_state()
    extras = irra_extras(embed=32, classes=50)
    blob = {"model": {f"base_model.{k}": v for k, v in src.items()} | extras}
    model, report = convert_checkpoint(blob, cfg)
    assert report.layout == "irra"
    assert set(report.unexpected) == set(extras)
    assert {k.split(".")[0] for k in report.unexpected} == set(IRRA_EXTRAS)
    assert set(report.missing) == _tse_keys(model)
    assert "left at init" in report.summary()
    _assert_loaded(model, expected_backbone(src, cfg))
    again, _ = convert_checkpoint(blob, cfg)  # heads left at init are seeded: same model
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_shape_mismatch_names_the_key() -> None:
    src = small_state()
    src["visual.ln_pre.weight"] = torch.zeros(65)
    with pytest.raises(ConversionError, match=r"visual\.ln_pre\.weight.*\(65,\).*\(64,\)"):
        convert_checkpoint(src, small_config())
    src = small_state(embed=48)  # projection width differs from the configured embed_dim
    with pytest.raises(ConversionError, match=r"proj.*checkpoint shape \((48, 64|64, 48)\)"):
        convert_checkpoint(src, small_config())
    src = small_state(vl=1)  # fewer layers than configured: a half-loaded backbone
    with pytest.raises(ConversionError, match="backbone"):
        convert_checkpoint(src, small_config())
    with pytest.raises(ConversionError, match="unknown checkpoint layout"):
        convert_checkpoint({"foo.weight": torch.zeros(1)}, small_config())


def test_text_positions_cut_and_interpolated() -> None:
    src = small_state()
    table = src["positional_embedding"]
    short, report = convert_checkpoint(src, small_config(context_length=64))
    got = short.state_dict()["text.tower.embeddings.position_embedding.weight"]
    assert torch.equal(got, table[:64]) and "cut 77 -> 64" in report.summary()

    long, report = convert_checkpoint(src, small_config(context_length=168))
    got = long.state_dict()["text.tower.embeddings.position_embedding.weight"]
    assert got.shape == (168, 64) and "interpolated 77 -> 168" in report.summary()
    assert torch.equal(got[0], table[0]) and torch.allclose(got[-1], table[-1])
    ref = F.interpolate(table.T[None], size=168, mode="linear", align_corners=True)[0].T
    torch.testing.assert_close(got, ref)
    assert long.text.tower.num_tokens == 166
    with torch.no_grad():
        assert long.text(_ids(2, 168)).shape == (2, 32 + 64)


def _scripted(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose state dict has exactly these names (like OpenAI's .pt)."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        if value.is_floating_point() and value.dim() > 0:
            mod.register_parameter(leaf, nn.Parameter(value.half(), requires_grad=False))
        else:
            mod.register_buffer(leaf, value)
    return torch.jit.script(root)


def test_torchscript_and_plain_files(tmp_path: Path) -> None:
    cfg = small_config()
    src = small_state()
    jit_path = tmp_path / "ViT-B-16.pt"
    _scripted(src).save(str(jit_path))
    model, report = convert_checkpoint(jit_path, cfg)
    assert report.layout == "openai-clip" and report.source == str(jit_path)
    half = {k: v.half() if v.is_floating_point() and v.dim() > 0 else v for k, v in src.items()}
    _assert_loaded(model, expected_backbone(half, cfg))  # fp16 archive, fp32 model

    plain = tmp_path / "state.pth"
    torch.save({"model": {f"base_model.{k}": v for k, v in src.items()} | rde_heads(32, 64)}, plain)
    out = tmp_path / "icl.pt"
    report = convert_to_file(plain, out, cfg)
    assert report.layout == "rde" and report.missing == ()
    again = load_checkpoint(out)
    _assert_loaded(again, expected_backbone(src, cfg))

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": src, "args": np.dtype("float32")}, pickled)  # not weights-only
    with pytest.raises(ConversionError, match="trust_pickle"):
        convert_checkpoint(pickled, cfg)
    _, report = convert_checkpoint(pickled, cfg, trust_pickle=True)
    assert report.layout == "openai-clip"


# ---------------------------------------------------------------- towers against transformers


def test_towers_match_transformers_clip_models() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    cfg = ModelConfig(
        image_size=(48, 48),
        embed_dim=32,
        image_tower=ClipVisionTower(width=64, layers=2, heads=2),
        text_tower=ClipTextTower(width=64, layers=2, heads=2),
        tse=TseConfig(enabled=False),
    )
    model, _ = convert_checkpoint(small_state(), cfg)
    vis, txt = model.image.tower, model.text.tower
    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2)
    common |= dict(num_attention_heads=2, attn_implementation="eager")
    hf_vis = CLIPVisionModel(CLIPVisionConfig(image_size=48, patch_size=16, **common)).eval()
    state = {
        k.replace("pre_layernorm", "pre_layrnorm"): v
        for k, v in vis.state_dict().items()
        if not k.startswith("proj.")
    }
    pos = state.pop("embeddings.position_embedding")
    state["embeddings.position_embedding.weight"] = pos
    hf_vis.load_state_dict(state, strict=True)
    hf_txt = CLIPTextModel(
        CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77, eos_token_id=2, **common)
    ).eval()
    state = {k: v for k, v in txt.state_dict().items() if not k.startswith("proj.")}
    hf_txt.load_state_dict(state, strict=True)

    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ids = _ids(2, 77)
    # Attention maps come from different kernels (ours fused, transformers eager): softmax
    # probabilities agree to float32 rounding, not to assert_close's default 1e-5.
    probs = dict(atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        ours, ref = vis(x), hf_vis(pixel_values=x, output_attentions=True)
        torch.testing.assert_close(ours.global_feature, vis.proj(ref.pooler_output))
        torch.testing.assert_close(ours.scores, ref.attentions[-1][:, :, 0, 1:].mean(1), **probs)
        ours, ref = txt(ids), hf_txt(input_ids=ids, output_attentions=True)
        torch.testing.assert_close(ours.global_feature, txt.proj(ref.pooler_output))
        torch.testing.assert_close(ours.tokens, txt.proj(ref.last_hidden_state))
        eot = ids.argmax(-1)
        attn = ref.attentions[-1].mean(1)[torch.arange(2), eot]
        torch.testing.assert_close(ours.scores, attn, **probs)
    # Causal: the EOT token attends to nothing after itself; valid excludes SOS/EOT/padding.
    assert torch.all(ours.scores[0, eot[0] + 1 :] == 0)
    assert ours.valid.sum(-1).tolist() == [3, 7]


# ---------------------------------------------------------------- ONNX export


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    from icl.onnx_encoders import onnx_session

    torch.manual_seed(0)
    cfg = small_config()
    model = DualEncoder(cfg).eval()
    cases = {
        "image": (model.image, "pixels", _pixels(2, (64, 32)), _pixels(3, (64, 32), seed=1)),
        "text": (model.text, "input_ids", _ids(2, 77), _ids(3, 77, seed=1)),
    }
    for name, (branch, input_name, example, probe) in cases.items():
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(
            branch,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["embedding"],
            dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        got = onnx_session(path).run(["embedding"], {input_name: probe.numpy()})[0]
        with torch.no_grad():
            want = branch(probe).numpy()
        assert got.shape == (3, cfg.output_dim), name
        assert _cos(got, want).min() >= 0.9999, name


def test_convert_command_reports_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """`icl convert` on an IRRA-layout file: one-line report, checkpoint loads; bad input fails."""
    from typer.testing import CliRunner

    from icl.cli import app

    cfg = small_config()
    src = tmp_path / "irra.pth"
    state = {f"base_model.{k}": v for k, v in small_state().items()}
    torch.save({"model": state | irra_extras(embed=32, classes=50)}, src)
    config = tmp_path / "model.toml"
    config.write_text(SMALL_TOML)
    runner = CliRunner()
    out = tmp_path / "converted.pt"
    args = ["convert", str(src), "--out", str(out), "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "irra" in result.output and "missing" in result.output
    assert load_checkpoint(out).config == cfg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    args = ["convert", str(junk), "--out", str(tmp_path / "x.pt"), "--config", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


SMALL_TOML = """
[model]
image_size = [64, 32]
embed_dim = 32
[model.image_tower]
kind = "clip_vit"
width = 64
layers = 2
heads = 2
[model.text_tower]
kind = "clip_transformer"
width = 64
layers = 2
heads = 2
[model.tse]
dim = 64
"""
