"""Llama (specs/llama.arch, with Llama 3.1's and YaRN's RoPE scaling) and Mistral
(specs/sliding_window.arch, every layer windowed).

The pieces other decoder families share — attention, SwiGLU and norm keys, the
config fields of a Llama-like model — are defined here and reused by Qwen,
Phi-3, Gemma and Mixtral.
"""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, Rename, Same, Tied, WeightMap

LAYER, OURS = "model.layers.{}", "layers.{}"

# The tied-or-not output head: the spec's canonical names decide (a spec without its own head.weight
# ties it to the embedding), never a spec parameter.
HEAD = Tied("embed.weight", untied="head.weight", flag="tie_word_embeddings")


def attention_keys(bias: bool = False, names=("q", "k", "v")) -> dict:
    """q/k/v/o projections (and q/k/v biases: Qwen2's attention has them, its o projection not)."""
    keys = {f"{LAYER}.self_attn.{n}_proj.weight": f"{OURS}.attn.{ours}.weight" for n, ours in zip("qkv", names)}
    keys[f"{LAYER}.self_attn.o_proj.weight"] = f"{OURS}.attn.o.weight"
    if bias:
        keys.update({f"{LAYER}.self_attn.{n}_proj.bias": f"{OURS}.attn.{ours}.bias" for n, ours in zip("qkv", names)})
    return keys


def mlp_keys(hf: str = f"{LAYER}.mlp", ours: str = f"{OURS}.mlp") -> dict:
    return {f"{hf}.{a}_proj.weight": f"{ours}.{a}.weight" for a in ("gate", "up", "down")}


def norm_keys(*values) -> dict:
    """The pre-attention, pre-MLP and final RMSNorms (with value transforms: Gemma's w - 1)."""
    return {f"{LAYER}.input_layernorm.weight": Rename(f"{OURS}.attn_norm.weight", *values),
            f"{LAYER}.post_attention_layernorm.weight": Rename(f"{OURS}.mlp_norm.weight", *values),
            "model.norm.weight": Rename("norm.weight", *values)}


LLAMA_KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **norm_keys(),
    **attention_keys(),
    **mlp_keys(),
    "lm_head.weight": HEAD,
}

# Fields of every Llama-like config.json: transformers' defaults and the checks they share.
PARAMS = {"vocab_size": "vocab", "hidden_size": "d_model", "intermediate_size": "d_ff",
          "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
          "rms_norm_eps": "eps"}
POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
            "num_key_value_heads": Same("num_attention_heads")}  # null or absent: no grouping
SILU = Only("silu", why="the spec's MLP is SwiGLU (silu)")
NO_BIAS = Only(False, why="the spec's attention projections have no bias")


def check_head_dim(c: dict) -> None:
    """The spec's head size is hidden_size / num_attention_heads (no head_dim parameter)."""
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    if c.get("head_dim") not in (None, head_dim):
        refuse(c, "head_dim", f"the spec's head size is hidden_size / num_attention_heads = {head_dim}")


def _llama(c: dict) -> dict:
    check_head_dim(c)
    return {}


LLAMA = WeightMap(
    model_type="llama", architecture="LlamaForCausalLM", base_prefix="model.",
    ignored=("model.layers.{}.self_attn.rotary_emb.inv_freq",),  # a buffer older transformers saved
    keys=LLAMA_KEYS,
    config=Config(
        params=PARAMS, optional={"tie_word_embeddings": "tie_embeddings"}, positive=POSITIVE, rope="rope_theta",
        rope_scaling=("llama3", "yarn"),
        defaults={**DEFAULTS, "attention_bias": False, "mlp_bias": False},
        require={"attention_bias": NO_BIAS, "mlp_bias": Only(False, why="the spec's MLP projections have no bias"),
                 "hidden_act": SILU},
        prepare=_llama,
    ),
)


# ----------------------------------------------------------------------------
# Mistral: Llama with a sliding window on every layer -> specs/sliding_window.arch, every layer local.
# HF's mask (key j visible to query i iff i - sliding_window < j <= i) is `window=` exactly.


def _mistral(c: dict) -> dict:
    check_head_dim(c)
    if c.get("sliding_window") is None:
        refuse(c, "sliding_window", "without a window Mistral is Llama: load it into specs/llama.arch with "
               "--arch llama")
    return {"global_every": c["num_hidden_layers"] + 1}  # not an HF field: no layer of Mistral is global


MISTRAL = WeightMap(
    model_type="mistral", architecture="MistralForCausalLM", base_prefix="model.",
    ignored=LLAMA.ignored, keys=LLAMA_KEYS,
    config=Config(
        params={**PARAMS, "sliding_window": "window"}, positive=POSITIVE, rope="rope_theta",
        defaults=DEFAULTS, require={"hidden_act": SILU}, prepare=_mistral,
    ),
)
