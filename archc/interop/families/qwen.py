"""Qwen2 (specs/qwen2.arch: Llama with q/k/v biases, the o projection without) and Qwen3
(specs/qwen3.arch: per-head RMSNorm of queries and keys before RoPE, head_dim set apart from the width)."""

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
    norm_keys,
)
from archc.interop.maps import Config, Only, WeightMap

NO_SLIDING = Only(False, why="the spec's attention sees the whole causal prefix (use_sliding_window is off in "
                             "released Qwen models)")


def _qwen2(c: dict) -> dict:
    check_head_dim(c)
    return {}


QWEN2 = WeightMap(
    model_type="qwen2", architecture="Qwen2ForCausalLM", base_prefix="model.",
    keys={"model.embed_tokens.weight": "embed.weight", **norm_keys(), **attention_keys(bias=True), **mlp_keys(),
          "lm_head.weight": HEAD},
    config=Config(
        params=PARAMS, optional={"tie_word_embeddings": "tie_embeddings"}, positive=POSITIVE, rope="rope_theta",
        defaults={**DEFAULTS, "use_sliding_window": False},
        require={"use_sliding_window": NO_SLIDING, "hidden_act": SILU}, prepare=_qwen2,
    ),
)

QWEN3 = WeightMap(
    model_type="qwen3", architecture="Qwen3ForCausalLM", base_prefix="model.",
    keys={"model.embed_tokens.weight": "embed.weight", **norm_keys(), **attention_keys(),
          f"{LAYER}.self_attn.q_norm.weight": f"{OURS}.attn.q_norm.weight",
          f"{LAYER}.self_attn.k_norm.weight": f"{OURS}.attn.k_norm.weight",
          **mlp_keys(), "lm_head.weight": HEAD},
    config=Config(
        params={**PARAMS, "head_dim": "head_dim"}, optional={"tie_word_embeddings": "tie_embeddings"},
        positive=POSITIVE, rope="rope_theta",
        defaults={**DEFAULTS, "head_dim": 128, "attention_bias": False, "use_sliding_window": False},
        require={"attention_bias": NO_BIAS, "use_sliding_window": NO_SLIDING, "hidden_act": SILU},
    ),
)
