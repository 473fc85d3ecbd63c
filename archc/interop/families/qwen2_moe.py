"""Qwen2-MoE (specs/qwen2_moe.arch): Qwen2's attention (q, k, v biases) and in every layer routed SwiGLU
experts — the top-k of a softmax over all experts, renormalised only with norm_topk_prob — plus a shared
SwiGLU expert scaled by sigmoid(x · shared_expert_gate)."""

from __future__ import annotations

from archc.interop.families.llama import DEFAULTS, HEAD, LAYER, OURS, SILU, attention_keys, check_head_dim, norm_keys
from archc.interop.families.qwen import NO_SLIDING
from archc.interop.maps import Config, Only, Stack, WeightMap

MLP, MOE = f"{LAYER}.mlp", f"{OURS}.moe"


def _swiglu(hf: str, ours: str) -> dict:
    return {f"{hf}.{a}_proj.weight": f"{ours}.{a}.weight" for a in ("gate", "up", "down")}


KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **norm_keys(),
    **attention_keys(bias=True),
    f"{MLP}.gate.weight": f"{MOE}.router.gate.weight",
    **_swiglu(f"{MLP}.experts.{{}}", f"{MOE}.experts.{{}}"),  # as saved; export writes these
    f"{MLP}.experts.gate_up_proj": Stack([f"{MOE}.experts.{{}}.gate.weight", f"{MOE}.experts.{{}}.up.weight"]),
    f"{MLP}.experts.down_proj": Stack([f"{MOE}.experts.{{}}.down.weight"]),  # in memory (transformers 5)
    **_swiglu(f"{MLP}.shared_expert", f"{MOE}.shared"),
    f"{MLP}.shared_expert_gate.weight": f"{MOE}.shared_gate.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": HEAD,
}


def _qwen2_moe(c: dict) -> dict:
    check_head_dim(c)
    return {}


# router_aux_loss_coef weights HF's Switch-style balance loss (only with output_router_logits); the spec's
# softmax router weights Shazeer's importance + load CV² with it. Neither affects logits.
QWEN2_MOE = WeightMap(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", base_prefix="model.", keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "num_experts": "n_experts",
                "num_experts_per_tok": "top_k", "moe_intermediate_size": "d_expert",
                "shared_expert_intermediate_size": "d_shared", "norm_topk_prob": "norm_topk_prob",
                "rms_norm_eps": "eps", "router_aux_loss_coef": "aux_weight"},
        optional={"tie_word_embeddings": "tie_embeddings"},
        positive=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"),
        rope="rope_theta",
        # transformers' Qwen2MoeConfig defaults
        defaults={**DEFAULTS, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True, "use_sliding_window": False},
        require={"decoder_sparse_step": Only(1, why="every layer of the spec is a mixture of experts"),
                 "mlp_only_layers": Only([], why="every layer of the spec is a mixture of experts"),
                 "qkv_bias": Only(True, why="the spec's q, k and v projections have biases"),
                 "use_sliding_window": NO_SLIDING, "hidden_act": SILU},
        prepare=_qwen2_moe,
    ),
)
