"""BLOOM (specs/bloom.arch): ALiBi instead of position embeddings (the spec's slopes are BLOOM's), a
LayerNorm after the embedding, q|k|v fused per head (rows [heads, 3, head_dim]: Split(groups=n_heads)),
biases everywhere, a tanh-GELU MLP four times as wide as the model, the head tied to the embedding."""

from __future__ import annotations

from archc.dsl.diagnostics import SpecError
from archc.interop.families.gpt_neox import affine
from archc.interop.maps import Config, Only, Same, Split, Tied, WeightMap

LAYER, OURS = "transformer.h.{}", "layers.{}"

KEYS = {
    "transformer.word_embeddings.weight": "embed.weight",
    **affine("transformer.word_embeddings_layernorm", "embed_norm"),
    **affine(f"{LAYER}.input_layernorm", f"{OURS}.attn_norm"),
    **{f"{LAYER}.self_attention.query_key_value.{p}": Split([f"{OURS}.attn.{t}.{p}" for t in "qkv"],
                                                           groups="n_heads")
       for p in ("weight", "bias")},
    **affine(f"{LAYER}.self_attention.dense", f"{OURS}.attn.o"),
    **affine(f"{LAYER}.post_attention_layernorm", f"{OURS}.mlp_norm"),
    **affine(f"{LAYER}.mlp.dense_h_to_4h", f"{OURS}.mlp.fc"),
    **affine(f"{LAYER}.mlp.dense_4h_to_h", f"{OURS}.mlp.proj"),
    **affine("transformer.ln_f", "norm"),
    "lm_head.weight": Tied("embed.weight", flag="tie_word_embeddings"),
}


def _export(params: dict) -> dict:
    if params["d_ff"] != 4 * params["d_model"]:
        raise SpecError(f"BLOOM's MLP is 4 × hidden_size wide; this spec's d_ff={params['d_ff']} is not "
                        f"4 × d_model={params['d_model']}")
    return {}


# Defaults of transformers' BloomConfig for the fields that change the computation (config.json names the
# layer and head counts n_layer and n_head; the oldest ones the width n_embed).
BLOOM = WeightMap(
    model_type="bloom", architecture="BloomForCausalLM", base_prefix="transformer.", keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "n_layer": "n_layers", "n_head": "n_heads",
                "layer_norm_epsilon": "eps"},
        positive=("vocab_size", "hidden_size", "n_layer", "n_head"),
        defaults={"hidden_size": Same("n_embed"), "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                  "apply_residual_connection_post_layernorm": False, "slow_but_exact": False},
        require={"apply_residual_connection_post_layernorm": Only(False, why="the spec adds each sublayer to its "
                                                                              "input, not to its normed input"),
                 "slow_but_exact": Only(False, why="the spec's output projection is one matmul")},
        export=_export,
    ),
)
