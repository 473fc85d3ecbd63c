"""Gemma 2 (specs/gemma2.arch): Gemma's decoder with sliding-window layers alternating with global ones
(layer_types: sliding on even layers), scores scaled by query_pre_attn_scalar^-1/2 and soft-capped,
RMSNorms before and after the attention and the MLP, and soft-capped logits. Every RMSNorm computes
(1 + w) and stores w: the map adds 1 on import and takes it off on export."""

from __future__ import annotations

from archc.interop.families.llama import DEFAULTS, LAYER, NO_BIAS, OURS, PARAMS, POSITIVE, attention_keys, mlp_keys
from archc.interop.hfconfig import refuse
from archc.interop.maps import Add, Config, Only, Rename, Tied, WeightMap

_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
          "pre_feedforward_layernorm": "pre_mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"}

KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **{f"{LAYER}.{hf}.weight": Rename(f"{OURS}.{ours}.weight", Add(1.0)) for hf, ours in _NORMS.items()},
    **attention_keys(),
    **mlp_keys(),
    "model.norm.weight": Rename("norm.weight", Add(1.0)),
    "lm_head.weight": Tied("embed.weight", flag="tie_word_embeddings"),
}


def layer_types(n_layers: int) -> list[str]:
    """transformers' default for Gemma 2, and the spec's: sliding on even layers, global on odd ones."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]


def _gemma2(c: dict) -> dict:
    if c.get("layer_types") is not None and list(c["layer_types"]) != layer_types(c["num_hidden_layers"]):
        refuse(c, "layer_types", "the spec's layers alternate sliding (even) and full (odd) attention")
    for field in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        value = c.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            refuse(c, field, "the spec needs a positive number here (it scales and soft-caps scores, soft-caps "
                             "logits and windows its local layers)")
    return {}


def _export(params: dict) -> dict:
    scalar = params["query_pre_attn_scalar"]  # an int in transformers' Gemma2Config
    return {"layer_types": layer_types(params["n_layers"]),
            "query_pre_attn_scalar": int(scalar) if scalar == int(scalar) else scalar}


# Defaults of transformers' Gemma2Config for the fields that change the computation.
GEMMA2 = WeightMap(
    model_type="gemma2", architecture="Gemma2ForCausalLM", base_prefix="model.", keys=KEYS,
    config=Config(
        params={**PARAMS, "head_dim": "head_dim", "query_pre_attn_scalar": "query_pre_attn_scalar",
                "sliding_window": "window", "attn_logit_softcapping": "attn_softcap",
                "final_logit_softcapping": "final_softcap"},
        positive=POSITIVE, rope="rope_theta",
        defaults={**DEFAULTS, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                  "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                  "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                  "use_bidirectional_attention": None},
        require={
            "hidden_activation": Only("gelu_pytorch_tanh", "gelu", "gelu_new",
                                      why="the spec's MLP is GeGLU with tanh-approximated GELU"),
            "attention_bias": NO_BIAS,
            "use_bidirectional_attention": Only(None, False, why="the spec's attention is causal"),
        },
        prepare=_gemma2, export=_export,
    ),
)
