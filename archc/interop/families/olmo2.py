"""OLMo 2 (specs/olmo2.arch): Llama's projections and SwiGLU with RMSNorms after (not before) the attention
and the MLP, and q_norm / k_norm over the whole projection (all heads at once), before RoPE."""

from __future__ import annotations

from archc.interop.families.llama import (
    DEFAULTS,
    HEAD,
    LAYER,
    NO_BIAS,
    OURS,
    PARAMS,
    POSITIVE,
    SILU,
    attention_keys,
    check_head_dim,
    mlp_keys,
)
from archc.interop.maps import Config, WeightMap

KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **attention_keys(),
    f"{LAYER}.self_attn.q_norm.weight": f"{OURS}.attn.q_norm.weight",
    f"{LAYER}.self_attn.k_norm.weight": f"{OURS}.attn.k_norm.weight",
    f"{LAYER}.post_attention_layernorm.weight": f"{OURS}.post_attn_norm.weight",
    **mlp_keys(),
    f"{LAYER}.post_feedforward_layernorm.weight": f"{OURS}.post_mlp_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": HEAD,
}


def _olmo2(c: dict) -> dict:
    check_head_dim(c)
    return {}


OLMO2 = WeightMap(
    model_type="olmo2", architecture="Olmo2ForCausalLM", base_prefix="model.", keys=KEYS,
    ignored=("model.layers.{}.self_attn.rotary_emb.inv_freq",),
    config=Config(
        params=PARAMS, optional={"tie_word_embeddings": "tie_embeddings"}, positive=POSITIVE, rope="rope_theta",
        defaults={**DEFAULTS, "rms_norm_eps": 1e-5, "attention_bias": False},
        require={"attention_bias": NO_BIAS, "hidden_act": SILU}, prepare=_olmo2,
    ),
)
