"""Mixtral and DeepSeek-V3 checkpoints load into the MoE specs and compute Hugging Face's logits.

Small random HF models (no download, eager attention, fp32; hf_checkpoints.py) are saved with
`save_pretrained` — experts one tensor each, as on the hub — or as the raw
in-memory state dict of transformers 5 (experts stacked, gate and up fused),
and loaded through the key maps of `archc.interop.hf`. Router weights are
scaled up so that no two experts' scores come close enough for rounding to
change which are chosen; DeepSeek's selection bias (e_score_correction_bias)
is random and nonzero, so it must be loaded into the router's expert_bias.
"""

import re
import shutil

import pytest
import torch
from hf_checkpoints import (
    COMMON,
    VOCAB,
    assert_same_logits,
    config,
    corrupt,
    randomise,
    spec_path,
)
from safetensors.torch import load_file, load_model, save_file

import archc
from archc.cli import main
from archc.dsl.diagnostics import SpecError
from archc.interop.hf import hf_overrides, load_hf
from archc.interop.weights import WeightsError, load_canonical

transformers = pytest.importorskip("transformers")

MIXTRAL_SPEC, DEEPSEEK_SPEC = spec_path("mixtral"), spec_path("deepseek_v3")

DEEPSEEK_CFGS = {
    "q_lora-interleaved": {"q_lora_rank": 24, "rope_interleave": True, "first_k_dense_replace": 1, "n_group": 2,
                           "topk_group": 1, "n_shared_experts": 1},
    "no_q_lora-rotate_half": {"q_lora_rank": None, "rope_interleave": False, "first_k_dense_replace": 2,
                              "n_group": 4, "topk_group": 2, "n_shared_experts": 2},
}


def _hf_deepseek(directory, variant):
    cfg = transformers.DeepseekV3Config(
        hidden_size=48, intermediate_size=72, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.7,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        max_position_embeddings=64, **COMMON, **DEEPSEEK_CFGS[variant],
    )
    torch.manual_seed(4)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    randomise(hf)
    hf.save_pretrained(directory)
    return directory, hf


@pytest.fixture
def mixtral(hf_checkpoints):
    return hf_checkpoints("mixtral")


@pytest.fixture
def deepseek(hf_checkpoints):
    return hf_checkpoints("deepseek_v3")


def _stacked(src, dst, hf):
    """The same model as transformers 5 holds it in memory: experts stacked [E, ...], gate and up fused."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, dst / "model.safetensors")
    return dst


def _assert_same_logits(model, hf):
    assert_same_logits(model, hf, moe=True)


# ---- Mixtral -----------------------------------------------------------------


def test_mixtral_matches_hf(mixtral):
    directory, hf = mixtral
    assert any(".block_sparse_moe.experts.5.w2." in k for k in load_file(directory / "model.safetensors"))
    compiled, model = load_hf(MIXTRAL_SPEC, directory)
    assert {k: compiled.params[k] for k in ("n_experts", "top_k", "d_expert", "n_kv_heads", "rope_theta",
                                            "aux_weight", "eps")} == \
        dict(n_experts=6, top_k=2, d_expert=40, n_kv_heads=2, rope_theta=31337.0, aux_weight=0.02, eps=1e-5)
    _assert_same_logits(model, hf)


def test_mixtral_stacked_experts_layout(mixtral, tmp_path):
    directory, hf = mixtral
    _compiled, model = load_hf(MIXTRAL_SPEC, _stacked(directory, tmp_path / "stacked", hf))
    _assert_same_logits(model, hf)


def test_mixtral_unfused_experts_match_too(mixtral):
    directory, hf = mixtral
    _compiled, model = load_hf(MIXTRAL_SPEC, directory, disable=("fuse_experts", "fuse_projections"))
    _assert_same_logits(model, hf)


# ---- DeepSeek-V3 -------------------------------------------------------------


@pytest.mark.parametrize("variant", list(DEEPSEEK_CFGS))
def test_deepseek_v3_matches_hf(tmp_path, variant):
    directory, hf = _hf_deepseek(tmp_path, variant)
    compiled, model = load_hf(DEEPSEEK_SPEC, directory)
    cfg = DEEPSEEK_CFGS[variant]
    dense = cfg["first_k_dense_replace"]
    assert compiled.params["n_dense"] == dense
    assert compiled.params["q_lora_rank"] == (cfg["q_lora_rank"] or 0)
    assert compiled.params["rope_interleave"] is cfg["rope_interleave"]
    assert [hasattr(layer, "moe") for layer in model.layers] == [i >= dense for i in range(3)]
    for i in range(dense, 3):  # the selection bias is loaded, not left at zero
        torch.testing.assert_close(model.layers[i].moe.router.expert_bias,
                                   hf.model.layers[i].mlp.gate.e_score_correction_bias, atol=0, rtol=0)
    _assert_same_logits(model, hf)


def test_deepseek_v3_stacked_experts_layout(deepseek, tmp_path):
    directory, hf = deepseek
    _compiled, model = load_hf(DEEPSEEK_SPEC, _stacked(directory, tmp_path / "stacked", hf))
    _assert_same_logits(model, hf)


def test_deepseek_v3_convert_cli(deepseek, tmp_path, capsys):
    directory, hf = deepseek
    out = tmp_path / "dsv3.safetensors"
    assert main(["convert", DEEPSEEK_SPEC, "--from-hf", str(directory), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "all weights matched" in err and "n_dense=1" in err
    model = archc.compile(DEEPSEEK_SPEC, hf_overrides("deepseek_v3", config(directory))).build().eval()
    load_model(model, out)  # strict: every key of our model (expert_bias buffers too), and nothing else
    _assert_same_logits(model, hf)


def test_deepseek_v3_skips_the_multi_token_prediction_layer(deepseek, tmp_path):
    directory, hf = deepseek
    assert config(directory)["num_nextn_predict_layers"] == 1
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(48, 96), "model.layers.3.enorm.weight": torch.ones(48)}
    _compiled, model = load_hf(DEEPSEEK_SPEC, corrupt(directory, tmp_path / "mtp", lambda s: s.update(mtp)))
    _assert_same_logits(model, hf)


# ---- MLA alone ---------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["q_lora", "no_q_lora"])
@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "rotate_half"])
def test_mla_matches_hf_attention(q_lora_rank, interleave):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_dsv3

    cfg = transformers.DeepseekV3Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, attn_implementation="eager")
    torch.manual_seed(5)
    attn = hf_dsv3.DeepseekV3Attention(cfg, layer_idx=0).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    spec = f"""
    model M(x: Tensor[B, T, 32]) {{
        y = mla(x, heads=4, q_lora_rank={q_lora_rank or 0}, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, rope_theta=500.0, rope_interleave={str(interleave).lower()})
        return y
    }}"""
    compiled = archc.compile(spec, name="mla.arch")
    model = compiled.build()
    names = {"q_a_proj": "q_a", "q_a_layernorm": "q_norm", "q_b_proj": "q_b", "q_proj": "q",
             "kv_a_proj_with_mqa": "kv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "kv_b", "o_proj": "o"}
    load_canonical(model, compiled, {f"attn.{names[k.split('.')[0]]}.weight": v for k, v in attn.state_dict().items()})
    x = torch.randn(2, 7, 32)
    cos_sin = hf_dsv3.DeepseekV3RotaryEmbedding(cfg)(x, torch.arange(7)[None])
    mask = torch.full((7, 7), float("-inf")).triu(1)
    with torch.no_grad():
        theirs, _weights = attn(x, cos_sin, mask)
        ours = model(x)["y"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_mla_shape_errors_are_located():
    spec = """
    model M(x: Tensor[B, T, 32]) {
        y = mla(x, heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=7, v_head_dim=8)
        return y
    }"""
    with pytest.raises(SpecError, match="even qk_rope_head_dim") as err:
        archc.compile(spec, name="bad.arch")
    assert err.value.span is not None and err.value.span.line == 3


# ---- configs and strictness --------------------------------------------------


def test_config_maps(mixtral, deepseek):
    assert hf_overrides("mixtral", config(mixtral[0])) == dict(
        vocab=VOCAB, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=6, top_k=2, d_expert=40,
        rope_theta=31337.0, eps=1e-5, aux_weight=0.02)
    assert hf_overrides("deepseek_v3", {**config(deepseek[0]), "q_lora_rank": None}) == dict(
        vocab=VOCAB, d_model=48, n_layers=3, n_dense=1, n_heads=4, q_lora_rank=0, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_theta=5000.0, rope_interleave=True, d_ff=72,
        n_experts=8, top_k=2, n_shared=1, d_expert=16, groups=2, top_groups=1, route_scale=1.7, eps=1e-5)


@pytest.mark.parametrize("arch, change, field", [
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4}}, "rope_type"),
    ("deepseek_v3", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 40.0}}, "rope_type"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"num_key_value_heads": 1}, "num_key_value_heads"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
    ("deepseek_v3", {"n_shared_experts": 0}, "n_shared_experts"),
])
def test_unrepresentable_configs_are_rejected(mixtral, deepseek, arch, change, field):
    base = config(mixtral[0] if arch == "mixtral" else deepseek[0])
    with pytest.raises(SpecError, match=field):
        hf_overrides(arch, {**base, **change})


BROKEN = {
    "missing expert": ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                       lambda s: s.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")),
    "expert past n": ("mixtral", "model.layers.0.block_sparse_moe.experts.6.w1.weight",
                      lambda s: s.update({"model.layers.0.block_sparse_moe.experts.6.w1.weight": torch.zeros(40, 48)})),
    "missing bias": ("deepseek_v3", "model.layers.2.mlp.gate.e_score_correction_bias",
                     lambda s: s.pop("model.layers.2.mlp.gate.e_score_correction_bias")),
    "router in a dense layer": ("deepseek_v3", "model.layers.0.mlp.gate.weight",
                                lambda s: s.update({"model.layers.0.mlp.gate.weight": torch.zeros(8, 48)})),
    "layer past the MTP one": ("deepseek_v3", "model.layers.4.enorm.weight",
                               lambda s: s.update({"model.layers.4.enorm.weight": torch.ones(48)})),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_strict_errors_name_the_key(mixtral, deepseek, tmp_path, problem):
    arch, key, edit = BROKEN[problem]
    src, spec = (mixtral[0], MIXTRAL_SPEC) if arch == "mixtral" else (deepseek[0], DEEPSEEK_SPEC)
    with pytest.raises(WeightsError, match=re.escape(key)):
        load_hf(spec, corrupt(src, tmp_path / "broken", edit))
