"""Mixtral (specs/mixtral.arch): Llama attention; the MLP is a mixture of SwiGLU experts w1 (gate),
w3 (up), w2 (down). HF's router (softmax over all experts, top-k, renormalised) gives the same gates
as the spec's softmax over the top-k logits."""

from __future__ import annotations

from archc.interop.families.llama import (
    DEFAULTS,
    HEAD,
    LAYER,
    OURS,
    SILU,
    attention_keys,
    check_head_dim,
    norm_keys,
)
from archc.interop.maps import Config, Only, Stack, WeightMap

KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **norm_keys(),
    **attention_keys(),
    # As saved (save_pretrained and the hub): one tensor per expert. Export writes this layout.
    f"{LAYER}.block_sparse_moe.gate.weight": f"{OURS}.moe.router.gate.weight",
    f"{LAYER}.block_sparse_moe.experts.{{}}.w1.weight": f"{OURS}.moe.experts.{{}}.gate.weight",
    f"{LAYER}.block_sparse_moe.experts.{{}}.w3.weight": f"{OURS}.moe.experts.{{}}.up.weight",
    f"{LAYER}.block_sparse_moe.experts.{{}}.w2.weight": f"{OURS}.moe.experts.{{}}.down.weight",
    # As transformers 5 holds them in memory (a raw state_dict): stacked, gate and up fused.
    f"{LAYER}.mlp.gate.weight": f"{OURS}.moe.router.gate.weight",
    f"{LAYER}.mlp.experts.gate_up_proj": Stack([f"{OURS}.moe.experts.{{}}.gate.weight",
                                                f"{OURS}.moe.experts.{{}}.up.weight"]),
    f"{LAYER}.mlp.experts.down_proj": Stack([f"{OURS}.moe.experts.{{}}.down.weight"]),
    "lm_head.weight": HEAD,
}


def _mixtral(c: dict) -> dict:
    check_head_dim(c)
    return {}


# router_aux_loss_coef weights HF's Switch-style balance loss (used only with output_router_logits);
# the spec's softmax router weights Shazeer's importance + load CV² with it. Neither affects logits.
MIXTRAL = WeightMap(
    model_type="mixtral", architecture="MixtralForCausalLM", base_prefix="model.", keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                "num_local_experts": "n_experts", "num_experts_per_tok": "top_k", "intermediate_size": "d_expert",
                "rms_norm_eps": "eps", "router_aux_loss_coef": "aux_weight"},
        positive=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "num_local_experts", "num_experts_per_tok", "intermediate_size"),
        rope="rope_theta", rope_default_theta=1e6,
        defaults={**DEFAULTS, "rms_norm_eps": 1e-5, "sliding_window": None, "router_jitter_noise": 0.0,
                  "router_aux_loss_coef": 0.001, "num_local_experts": 8, "num_experts_per_tok": 2},
        require={"sliding_window": Only(None, why="the spec's attention sees the whole causal prefix (no sliding "
                                                  "window)"),
                 "router_jitter_noise": Only(0.0, why="the spec's router has no input jitter"),
                 "hidden_act": SILU},
        prepare=_mixtral,
    ),
)
