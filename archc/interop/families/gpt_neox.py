"""GPT-NeoX / Pythia (specs/gpt_neox.arch): q|k|v fused per head (rows [heads, 3, head_dim]: cut with
Split(groups=n_heads)), RoPE on the first partial_rotary_factor · head_dim dims of each head (`rope_dim`;
transformers' default factor 0.25, older configs' rotary_pct / rotary_emb_base read as well), LayerNorms
and projections with biases, a GELU MLP, and the parallel residual of use_parallel_residual."""

from __future__ import annotations

from archc.interop.maps import Config, Only, Split, Tied, WeightMap

LAYER, OURS = "gpt_neox.layers.{}", "layers.{}"


def affine(hf: str, ours: str) -> dict:
    return {f"{hf}.{p}": f"{ours}.{p}" for p in ("weight", "bias")}


KEYS = {
    "gpt_neox.embed_in.weight": "embed.weight",
    **affine(f"{LAYER}.input_layernorm", f"{OURS}.attn_norm"),
    **{f"{LAYER}.attention.query_key_value.{p}": Split([f"{OURS}.attn.{t}.{p}" for t in "qkv"], groups="n_heads")
       for p in ("weight", "bias")},
    **affine(f"{LAYER}.attention.dense", f"{OURS}.attn.o"),
    **affine(f"{LAYER}.post_attention_layernorm", f"{OURS}.mlp_norm"),
    **affine(f"{LAYER}.mlp.dense_h_to_4h", f"{OURS}.mlp.fc"),
    **affine(f"{LAYER}.mlp.dense_4h_to_h", f"{OURS}.mlp.proj"),
    **affine("gpt_neox.final_layer_norm", "norm"),
    "embed_out.weight": Tied("embed.weight", untied="head.weight", flag="tie_word_embeddings"),
}

# Defaults of transformers' GPTNeoXConfig for the fields that change the computation.
GPT_NEOX = WeightMap(
    model_type="gpt_neox", architecture="GPTNeoXForCausalLM", base_prefix="gpt_neox.", keys=KEYS,
    ignored=("gpt_neox.layers.{}.attention.bias", "gpt_neox.layers.{}.attention.masked_bias",
             "gpt_neox.layers.{}.attention.rotary_emb.inv_freq"),  # buffers older transformers saved
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                "num_attention_heads": "n_heads", "intermediate_size": "d_ff", "layer_norm_eps": "eps",
                "use_parallel_residual": "parallel_residual"},
        optional={"tie_word_embeddings": "tie_embeddings"},
        positive=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
        rope="rope_theta", rope_dim="rope_dim", rope_default_partial=0.25,
        defaults={"layer_norm_eps": 1e-5, "use_parallel_residual": True, "attention_bias": True, "hidden_act": "gelu",
                  "tie_word_embeddings": False},
        require={"attention_bias": Only(True, why="the spec's attention projections have biases"),
                 "hidden_act": Only("gelu", why="the spec's MLP uses exact GELU")},
    ),
)
