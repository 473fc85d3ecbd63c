"""DeepSeek-V3 (specs/deepseek_v3.arch): Multi-head Latent Attention, dense SwiGLU in the first
first_k_dense_replace layers, then sigmoid-routed experts (e_score_correction_bias is the spec's
aux-free selection bias) plus shared ones. The multi-token-prediction layers after the last layer
are not part of the spec and are skipped."""

from __future__ import annotations

from archc.interop.families.llama import HEAD, LAYER, OURS, mlp_keys
from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, Same, Stack, WeightMap

_MLA = {"q_proj": "q", "q_a_proj": "q_a", "q_a_layernorm": "q_norm", "q_b_proj": "q_b",  # q_proj: q_lora_rank null
        "kv_a_proj_with_mqa": "kv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "kv_b", "o_proj": "o"}

KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    f"{LAYER}.input_layernorm.weight": f"{OURS}.attn_norm.weight",
    **{f"{LAYER}.self_attn.{hf}.weight": f"{OURS}.attn.{ours}.weight" for hf, ours in _MLA.items()},
    f"{LAYER}.post_attention_layernorm.weight": f"{OURS}.mlp_norm.weight",
    **mlp_keys(),  # the dense layers
    f"{LAYER}.mlp.gate.weight": f"{OURS}.moe.router.gate.weight",
    f"{LAYER}.mlp.gate.e_score_correction_bias": f"{OURS}.moe.router.expert_bias",
    **mlp_keys(f"{LAYER}.mlp.experts.{{}}", f"{OURS}.moe.experts.{{}}"),  # as saved; export writes these
    f"{LAYER}.mlp.experts.gate_up_proj": Stack([f"{OURS}.moe.experts.{{}}.gate.weight",
                                                f"{OURS}.moe.experts.{{}}.up.weight"]),  # in memory
    f"{LAYER}.mlp.experts.down_proj": Stack([f"{OURS}.moe.experts.{{}}.down.weight"]),
    **mlp_keys(f"{LAYER}.mlp.shared_experts", f"{OURS}.moe.shared"),
    "model.norm.weight": "norm.weight",
    "lm_head.weight": HEAD,
}


def _deepseek_v3(c: dict) -> dict:
    c["q_lora_rank"] = c["q_lora_rank"] or 0  # null: queries projected straight from the input
    c["n_group"], c["topk_group"] = c["n_group"] or 1, c["topk_group"] or 1
    if c["num_key_value_heads"] != c["num_attention_heads"]:
        refuse(c, "num_key_value_heads", "MLA expands its latent into one key and value per head")
    if c["n_shared_experts"] < 1:
        refuse(c, "n_shared_experts", "the spec has shared experts")
    return {}


def _export(params: dict) -> dict:
    return {"q_lora_rank": params["q_lora_rank"] or None, "num_key_value_heads": params["n_heads"]}


# Defaults of transformers' DeepseekV3Config for the fields that change the computation.
DEEPSEEK_V3 = WeightMap(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", base_prefix="model.", keys=KEYS,
    extra_layers="num_nextn_predict_layers",
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                "first_k_dense_replace": "n_dense", "num_attention_heads": "n_heads", "q_lora_rank": "q_lora_rank",
                "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
                "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
                "rope_interleave": "rope_interleave", "intermediate_size": "d_ff", "n_routed_experts": "n_experts",
                "num_experts_per_tok": "top_k", "n_shared_experts": "n_shared",
                "moe_intermediate_size": "d_expert", "n_group": "groups", "topk_group": "top_groups",
                "routed_scaling_factor": "route_scale", "rms_norm_eps": "eps"},
        positive=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_rope_head_dim", "v_head_dim", "intermediate_size", "n_routed_experts", "num_experts_per_tok",
                  "moe_intermediate_size"),
        rope="rope_theta",
        defaults={"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
                  "rope_interleave": True, "norm_topk_prob": True, "scoring_func": "sigmoid",
                  "topk_method": "noaux_tc", "first_k_dense_replace": 3, "n_shared_experts": 1,
                  "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                  "qk_nope_head_dim": 128, "v_head_dim": 128, "n_group": 8, "topk_group": 4,
                  "num_experts_per_tok": 8, "n_routed_experts": 256, "moe_intermediate_size": 2048,
                  "num_key_value_heads": Same("num_attention_heads")},
        require={"scoring_func": Only("sigmoid", why="the spec's deepseek_v3 router scores by sigmoid"),
                 "topk_method": Only("noaux_tc", why="the spec's router picks experts by bias-corrected, "
                                                     "group-limited top-k (noaux_tc)"),
                 "norm_topk_prob": Only(True, why="the spec's router renormalises the chosen gates"),
                 "attention_bias": Only(False, why="the spec's MLA projections have no bias"),
                 "hidden_act": Only("silu", why="the spec's MLPs and experts are SwiGLU (silu)")},
        prepare=_deepseek_v3, export=_export,
    ),
)
