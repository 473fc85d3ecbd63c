"""Phi-3 (specs/phi3.arch): Llama's decoder with q|k|v fused into one projection (cut by the model's
sizes: fewer kv heads give unequal parts) and gate|up fused; sliding_window (Phi-3-mini-4k: 2047)
becomes `window` on every layer, 0 for none."""

from __future__ import annotations

from archc.interop.families.llama import (
    DEFAULTS,
    HEAD,
    LAYER,
    OURS,
    PARAMS,
    POSITIVE,
    SILU,
    check_head_dim,
    norm_keys,
)
from archc.interop.maps import Config, Split, WeightMap

KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **norm_keys(),
    f"{LAYER}.self_attn.qkv_proj.weight": Split([f"{OURS}.attn.{p}.weight" for p in "qkv"]),
    f"{LAYER}.self_attn.o_proj.weight": f"{OURS}.attn.o.weight",
    f"{LAYER}.mlp.gate_up_proj.weight": Split([f"{OURS}.mlp.gate.weight", f"{OURS}.mlp.up.weight"]),
    f"{LAYER}.mlp.down_proj.weight": f"{OURS}.mlp.down.weight",
    "lm_head.weight": HEAD,
}


def _phi3(c: dict) -> dict:
    check_head_dim(c)
    return {"window": c["sliding_window"] or 0}


def _export(params: dict) -> dict:
    return {"sliding_window": params["window"] or None}


PHI3 = WeightMap(
    model_type="phi3", architecture="Phi3ForCausalLM", base_prefix="model.", keys=KEYS,
    config=Config(
        params=PARAMS, optional={"tie_word_embeddings": "tie_embeddings"}, positive=POSITIVE, rope="rope_theta",
        defaults={**DEFAULTS, "rms_norm_eps": 1e-5, "sliding_window": None}, require={"hidden_act": SILU},
        prepare=_phi3, export=_export,
    ),
)
