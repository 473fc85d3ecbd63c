"""Load Hugging Face checkpoints (GPT-2, Llama, Mistral, Mixtral, DeepSeek-V3) into archc-compiled models.

A checkpoint from the ecosystem is a directory holding `config.json`
(hyperparameters) and `model.safetensors` (tensors named after HF's modules).
Each supported architecture is described declaratively, torchtitan style:

  * a config map, HF config field -> spec parameter, plus a check that rejects
    the HF features the spec cannot express (better an error than a model that
    loads and computes something else);
  * a key map, HF key pattern ("{}" = a layer or expert index, in order) -> a
    rule for what the tensor becomes in archc's canonical names (see
    interop/weights.py): a plain string renames, `Transpose` flips GPT-2's
    Conv1D [in, out] layout, `Split` cuts a fused tensor into its parts,
    `Unstack` cuts stacked expert weights [E, ...] into one tensor per expert,
    `Tied` drops a copy of a tied weight. A map may list two layouts of the same
    weights (transformers 5 keeps experts stacked in memory but saves them one by
    one); a checkpoint uses either.

Conversion is strict: every HF key is consumed and every weight the model has
is present, and all problems are reported together, by HF key. Only
safetensors files are read (never pickle), so opening a checkpoint cannot run
code.

    compiled, model = load_hf("specs/llama.arch", "path/to/hf_dir")
    archc convert specs/gpt2.arch --from-hf path/to/gpt2 -o gpt2.safetensors
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from archc.dsl.diagnostics import SpecError
from archc.interop.weights import WeightsError, load_canonical, to_canonical

__all__ = ["Transpose", "Split", "Unstack", "Tied", "ARCHS", "hf_overrides", "convert_state_dict", "expected_weights",
           "read_hf", "load_hf", "save_converted", "load_for_convert"]


# ----------------------------------------------------------------------------
# Rules: what one HF tensor becomes. Target names may hold "{}" for the layer.


@attrs.frozen
class Transpose:
    """HF stores this weight as [in, out] (GPT-2's Conv1D); nn.Linear wants [out, in]."""

    target: str


@attrs.frozen
class Split:
    """A fused tensor cut into equal parts along `dim` (HF's layout), each part optionally transposed."""

    targets: tuple[str, ...] = attrs.field(converter=tuple)
    dim: int = 0
    transpose: bool = False


@attrs.frozen
class Unstack:
    """Experts stacked on dim 0 ([E, ...], transformers 5's fused experts): expert e's slice becomes
    `targets` (cut into equal parts along `dim` of the slice when there are several, each optionally
    transposed). Targets hold one "{}" more than the key: the expert index."""

    targets: tuple[str, ...] = attrs.field(converter=tuple)
    dim: int = 0
    transpose: bool = False


@attrs.frozen
class Tied:
    """A copy of the tied weight `target`: dropped, but checked equal to it when a checkpoint stores it."""

    target: str


Rule = Union[str, Transpose, Split, Unstack, Tied]


@attrs.frozen
class ArchMap:
    """How one HF architecture's checkpoint and config map onto an archc spec."""

    keys: dict[str, Rule]
    config: dict[str, str]  # HF config field -> spec parameter
    prepare: Callable[[dict], dict]  # fills HF's defaults, rejects what the spec cannot express
    base_prefix: str  # checkpoints saved from the bare base model (the hub's `gpt2`) lack it
    ignored: tuple[str, ...] = ()  # buffers older transformers saved; we recompute them
    tied: dict[str, Rule] = attrs.Factory(dict)  # replaces `keys` entries when the embeddings are tied
    # Every key pattern occurs in every layer. When not (dense and MoE layers, expert counts, two
    # layouts), only the model's own weight names tell which keys must be there: see `expect`.
    uniform: bool = True
    extra_layers: str | None = None  # config field counting trailing layers the spec drops (DeepSeek's MTP)


# ----------------------------------------------------------------------------
# GPT-2


def _qkv(suffix: str) -> list[str]:
    return [f"h.{{}}.attn.{part}.{suffix}" for part in ("q", "k", "v")]


GPT2_KEYS: dict[str, Rule] = {
    "transformer.wte.weight": "wte.weight",
    "transformer.wpe.weight": "wpe.weight",
    "transformer.h.{}.ln_1.weight": "h.{}.ln_1.weight",
    "transformer.h.{}.ln_1.bias": "h.{}.ln_1.bias",
    # c_attn is q, k, v side by side on the output axis, which is dim 1 in Conv1D's [in, out].
    "transformer.h.{}.attn.c_attn.weight": Split(_qkv("weight"), dim=1, transpose=True),
    "transformer.h.{}.attn.c_attn.bias": Split(_qkv("bias"), dim=0),
    "transformer.h.{}.attn.c_proj.weight": Transpose("h.{}.attn.o.weight"),
    "transformer.h.{}.attn.c_proj.bias": "h.{}.attn.o.bias",
    "transformer.h.{}.ln_2.weight": "h.{}.ln_2.weight",
    "transformer.h.{}.ln_2.bias": "h.{}.ln_2.bias",
    "transformer.h.{}.mlp.c_fc.weight": Transpose("h.{}.mlp.fc.weight"),
    "transformer.h.{}.mlp.c_fc.bias": "h.{}.mlp.fc.bias",
    "transformer.h.{}.mlp.c_proj.weight": Transpose("h.{}.mlp.proj.weight"),
    "transformer.h.{}.mlp.c_proj.bias": "h.{}.mlp.proj.bias",
    "transformer.ln_f.weight": "ln_f.weight",
    "transformer.ln_f.bias": "ln_f.bias",
    "lm_head.weight": Tied("wte.weight"),  # the spec always ties the head to wte
}

# Dropout is a training choice, not part of a checkpoint: the spec's default stays.
GPT2_CONFIG = {"vocab_size": "vocab", "n_positions": "max_len", "n_embd": "d_model", "n_layer": "n_layers",
               "n_head": "n_heads", "layer_norm_epsilon": "eps"}


def _gpt2_config(config: dict) -> dict:
    c = {"layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None, "scale_attn_weights": True,
         "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True,
         **config}
    _require_fields(c, GPT2_CONFIG)
    _supported(c, "activation_function", c["activation_function"] in ("gelu_new", "gelu_pytorch_tanh"),
               "the spec's MLP uses tanh-approximated GELU")
    _supported(c, "n_inner", c["n_inner"] in (None, 4 * c["n_embd"]), "the spec's MLP width is 4 * n_embd")
    _supported(c, "scale_attn_weights", c["scale_attn_weights"], "the spec scales attention by 1/sqrt(head_dim)")
    _supported(c, "scale_attn_by_inverse_layer_idx", not c["scale_attn_by_inverse_layer_idx"],
               "the spec does not scale attention per layer")
    _supported(c, "add_cross_attention", not c["add_cross_attention"], "the spec has no cross-attention")
    _supported(c, "tie_word_embeddings", c["tie_word_embeddings"], "the spec ties lm_head to wte")
    return c


# ----------------------------------------------------------------------------
# Llama


LLAMA_KEYS: dict[str, Rule] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}

LLAMA_CONFIG = {"vocab_size": "vocab", "hidden_size": "d_model", "intermediate_size": "d_ff",
                "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                "num_key_value_heads": "n_kv_heads", "rope_theta": "rope_theta", "rms_norm_eps": "eps",
                "tie_word_embeddings": "tie_embeddings"}


def _llama_config(config: dict) -> dict:
    c = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
         "hidden_act": "silu", **config}
    c.setdefault("num_key_value_heads", c.get("num_attention_heads"))  # HF's default: no grouping
    _rope(c, default_theta=10000.0)
    _require_fields(c, LLAMA_CONFIG)
    _supported(c, "attention_bias", not c["attention_bias"], "the spec's attention projections have no bias")
    _supported(c, "mlp_bias", not c["mlp_bias"], "the spec's MLP projections have no bias")
    _supported(c, "hidden_act", c["hidden_act"] == "silu", "the spec's MLP is SwiGLU (silu)")
    _head_dim(c)
    return c


def _rope(c: dict, default_theta: float) -> None:
    """Sets c["rope_theta"]; refuses scaled RoPE (llama3, linear, dynamic, yarn, ...)."""
    # transformers 5 writes {"rope_parameters": {"rope_type", "rope_theta"}}; older files have a top-level
    # rope_theta and an optional "rope_scaling" ({"type"} or {"rope_type"}).
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    c["rope_theta"] = rope.get("rope_theta", c.get("rope_theta", default_theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _supported(c, "rope_type", rope_type == "default", "the spec's RoPE is unscaled", rope_type)


def _head_dim(c: dict) -> None:
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    _supported(c, "head_dim", c.get("head_dim") in (None, head_dim),
               f"the spec's head size is hidden_size / num_attention_heads = {head_dim}")


# ----------------------------------------------------------------------------
# Mistral: Llama with a sliding window on every layer -> specs/sliding_window.arch, every layer local.
# HF's mask (key j visible to query i iff i - sliding_window < j <= i) is `window=` exactly.

MISTRAL_CONFIG = {**{k: v for k, v in LLAMA_CONFIG.items() if k != "tie_word_embeddings"},
                  "sliding_window": "window", "global_every": "global_every"}


def _mistral_config(config: dict) -> dict:
    c = _llama_config(config)
    _supported(c, "tie_word_embeddings", not c["tie_word_embeddings"], "the sliding-window spec's head is untied")
    _supported(c, "sliding_window", c.get("sliding_window") is not None,
               "without a window Mistral is Llama: load it into specs/llama.arch with --arch llama")
    c["global_every"] = c["num_hidden_layers"] + 1  # not an HF field: no layer of Mistral is global
    return c


# ----------------------------------------------------------------------------
# Mixtral: Llama attention; the MLP is a mixture of SwiGLU experts w1 (gate), w3 (up), w2 (down).
# HF's router (softmax over all experts, top-k, renormalised) gives the same gates as the spec's
# softmax over the top-k logits.


_LLAMA_ATTENTION_AND_NORMS = {k: v for k, v in LLAMA_KEYS.items() if ".self_attn." in k or "_layernorm." in k}

MIXTRAL_KEYS: dict[str, Rule] = {
    "model.embed_tokens.weight": "embed.weight",
    **_LLAMA_ATTENTION_AND_NORMS,
    # As saved (save_pretrained and the hub): one tensor per expert.
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.moe.router.gate.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": "layers.{}.moe.experts.{}.gate.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": "layers.{}.moe.experts.{}.up.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": "layers.{}.moe.experts.{}.down.weight",
    # As transformers 5 holds them in memory (a raw state_dict): stacked, gate and up fused.
    "model.layers.{}.mlp.gate.weight": "layers.{}.moe.router.gate.weight",
    "model.layers.{}.mlp.experts.gate_up_proj": Unstack(["layers.{}.moe.experts.{}.gate.weight",
                                                         "layers.{}.moe.experts.{}.up.weight"]),
    "model.layers.{}.mlp.experts.down_proj": Unstack(["layers.{}.moe.experts.{}.down.weight"]),
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}

# router_aux_loss_coef weights HF's Switch-style balance loss (used only with output_router_logits);
# the spec's softmax router weights Shazeer's importance + load CV² with it. Neither affects logits.
MIXTRAL_CONFIG = {"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                  "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                  "num_local_experts": "n_experts", "num_experts_per_tok": "top_k", "intermediate_size": "d_expert",
                  "rope_theta": "rope_theta", "rms_norm_eps": "eps", "router_aux_loss_coef": "aux_weight"}


def _mixtral_config(config: dict) -> dict:
    c = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": None,
         "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.001, "num_local_experts": 8,
         "num_experts_per_tok": 2, **config}
    c.setdefault("num_key_value_heads", c.get("num_attention_heads"))
    _rope(c, default_theta=1e6)
    _require_fields(c, MIXTRAL_CONFIG)
    _supported(c, "sliding_window", c["sliding_window"] is None,
               "the spec's attention sees the whole causal prefix (no sliding window)")
    _supported(c, "router_jitter_noise", not c["router_jitter_noise"], "the spec's router has no input jitter")
    _supported(c, "hidden_act", c["hidden_act"] == "silu", "the spec's experts are SwiGLU (silu)")
    _supported(c, "tie_word_embeddings", not c["tie_word_embeddings"], "the spec's head is not tied to the embedding")
    _head_dim(c)
    return c


# ----------------------------------------------------------------------------
# DeepSeek-V3: Multi-head Latent Attention, dense SwiGLU in the first first_k_dense_replace layers, then
# sigmoid-routed experts (e_score_correction_bias is the spec's aux-free selection bias) plus shared ones.


def _mlp(hf: str, ours: str, parts=(("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))) -> dict:
    return {f"{hf}.{a}.weight": f"{ours}.{b}.weight" for a, b in parts}


DEEPSEEK_V3_KEYS: dict[str, Rule] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q.weight",  # q_lora_rank null
    "model.layers.{}.self_attn.q_a_proj.weight": "layers.{}.attn.q_a.weight",
    "model.layers.{}.self_attn.q_a_layernorm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.q_b_proj.weight": "layers.{}.attn.q_b.weight",
    "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight": "layers.{}.attn.kv_a.weight",
    "model.layers.{}.self_attn.kv_a_layernorm.weight": "layers.{}.attn.kv_norm.weight",
    "model.layers.{}.self_attn.kv_b_proj.weight": "layers.{}.attn.kv_b.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    **_mlp("model.layers.{}.mlp", "layers.{}.mlp"),  # the dense layers
    "model.layers.{}.mlp.gate.weight": "layers.{}.moe.router.gate.weight",
    "model.layers.{}.mlp.gate.e_score_correction_bias": "layers.{}.moe.router.expert_bias",
    **_mlp("model.layers.{}.mlp.experts.{}", "layers.{}.moe.experts.{}"),  # as saved
    "model.layers.{}.mlp.experts.gate_up_proj": Unstack(["layers.{}.moe.experts.{}.gate.weight",
                                                         "layers.{}.moe.experts.{}.up.weight"]),  # in memory
    "model.layers.{}.mlp.experts.down_proj": Unstack(["layers.{}.moe.experts.{}.down.weight"]),
    **_mlp("model.layers.{}.mlp.shared_experts", "layers.{}.moe.shared"),
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}

DEEPSEEK_V3_CONFIG = {"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                      "first_k_dense_replace": "n_dense", "num_attention_heads": "n_heads",
                      "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
                      "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
                      "v_head_dim": "v_head_dim", "rope_theta": "rope_theta", "rope_interleave": "rope_interleave",
                      "intermediate_size": "d_ff", "n_routed_experts": "n_experts", "num_experts_per_tok": "top_k",
                      "n_shared_experts": "n_shared", "moe_intermediate_size": "d_expert", "n_group": "groups",
                      "topk_group": "top_groups", "routed_scaling_factor": "route_scale", "rms_norm_eps": "eps"}


def _deepseek_v3_config(config: dict) -> dict:
    # Defaults of transformers' DeepseekV3Config for the fields that change the computation.
    c = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
         "rope_interleave": True, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
         "first_k_dense_replace": 3, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "q_lora_rank": 1536,
         "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
         "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "n_routed_experts": 256,
         "moe_intermediate_size": 2048, **config}
    c.setdefault("num_key_value_heads", c.get("num_attention_heads"))
    c["q_lora_rank"] = c["q_lora_rank"] or 0  # null: queries projected straight from the input
    c["n_group"], c["topk_group"] = c["n_group"] or 1, c["topk_group"] or 1
    _rope(c, default_theta=10000.0)
    _require_fields(c, DEEPSEEK_V3_CONFIG)
    _supported(c, "quantization_config", c.get("quantization_config") is None,
               "quantized (e.g. FP8 block-scaled) checkpoints must be dequantized to bf16/fp32 first",
               (c.get("quantization_config") or {}).get("quant_method", c.get("quantization_config")))
    _supported(c, "scoring_func", c["scoring_func"] == "sigmoid", "the spec's deepseek_v3 router scores by sigmoid")
    _supported(c, "topk_method", c["topk_method"] == "noaux_tc",
               "the spec's router picks experts by bias-corrected, group-limited top-k (noaux_tc)")
    _supported(c, "norm_topk_prob", c["norm_topk_prob"], "the spec's router renormalises the chosen gates")
    _supported(c, "num_key_value_heads", c["num_key_value_heads"] == c["num_attention_heads"],
               "MLA expands its latent into one key and value per head")
    _supported(c, "attention_bias", not c["attention_bias"], "the spec's MLA projections have no bias")
    _supported(c, "hidden_act", c["hidden_act"] == "silu", "the spec's MLPs and experts are SwiGLU (silu)")
    _supported(c, "n_shared_experts", c["n_shared_experts"] >= 1, "the spec has shared experts")
    _supported(c, "tie_word_embeddings", not c["tie_word_embeddings"], "the spec's head is not tied to the embedding")
    return c


ARCHS: dict[str, ArchMap] = {
    "gpt2": ArchMap(GPT2_KEYS, GPT2_CONFIG, _gpt2_config, base_prefix="transformer.",
                    ignored=("transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias")),
    "llama": ArchMap(LLAMA_KEYS, LLAMA_CONFIG, _llama_config, base_prefix="model.",
                     ignored=("model.layers.{}.self_attn.rotary_emb.inv_freq",),
                     tied={"lm_head.weight": Tied("embed.weight")}),
    "mistral": ArchMap(LLAMA_KEYS, MISTRAL_CONFIG, _mistral_config, base_prefix="model.",
                       ignored=("model.layers.{}.self_attn.rotary_emb.inv_freq",)),
    "mixtral": ArchMap(MIXTRAL_KEYS, MIXTRAL_CONFIG, _mixtral_config, base_prefix="model.", uniform=False),
    "deepseek_v3": ArchMap(DEEPSEEK_V3_KEYS, DEEPSEEK_V3_CONFIG, _deepseek_v3_config, base_prefix="model.",
                           uniform=False, extra_layers="num_nextn_predict_layers"),
}


def _require_fields(config: dict, fields: dict[str, str]) -> None:
    absent = [f for f in fields if config.get(f) is None]
    if absent:
        raise SpecError(f"config.json lacks {', '.join(absent)}",
                        hint=f"needed for the spec's {', '.join(fields[f] for f in absent)}")


def _supported(config: dict, field: str, ok: bool, why: str, value: Any = None) -> None:
    if not ok:
        value = config.get(field) if value is None else value
        raise SpecError(f"config.json {field}={value!r} cannot be represented by the spec: {why}")


def _arch(arch: str) -> ArchMap:
    if arch not in ARCHS:
        raise SpecError(f"Hugging Face model_type {arch!r} is not supported",
                        hint=f"supported: {', '.join(ARCHS)} (--arch forces one for a compatible model)")
    return ARCHS[arch]


# ----------------------------------------------------------------------------
# Public API


def hf_overrides(arch: str, config: dict) -> dict[str, Any]:
    """Spec parameter overrides from an HF config.json dict; SpecError for what the spec cannot express."""
    spec_map = _arch(arch)
    prepared = spec_map.prepare(config)
    return {param: prepared[field] for field, param in spec_map.config.items()}


def convert_state_dict(arch: str, hf_state: dict[str, torch.Tensor], n_layers: int, *,
                       tie_embeddings: bool = False, expect: Mapping[str, Sequence[int]] | None = None,
                       extra_layers: int = 0) -> dict[str, torch.Tensor]:
    """An HF state dict in archc's canonical names. Strict: raises WeightsError naming every
    unknown, missing or unsplittable HF key. `tie_embeddings` applies the tied-head rules
    (Llama's tie_word_embeddings; GPT-2 always ties).

    `expect` — the model's canonical weight names (and shapes), see `expected_weights` — is what a
    checkpoint must provide, no more and no less. Without it only the layer count is checked, and
    missing keys only for maps whose every key occurs in every layer (GPT-2, Llama). Keys of the
    `extra_layers` layers after the last (DeepSeek-V3's multi-token-prediction module) are skipped."""
    tensors, _sources = _convert(arch, hf_state, n_layers, tie_embeddings, expect,
                                 range(n_layers, n_layers + extra_layers))
    return tensors


def expected_weights(compiled, model: torch.nn.Module | None = None) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of everything the model's state dict holds, saved buffers included
    (the aux-free routers' expert_bias): what a converted checkpoint must provide."""
    model = compiled.build() if model is None else model
    return {name: tuple(t.shape) for name, t in to_canonical(compiled, model.state_dict()).items()}


def read_hf(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the tensors of model.safetensors (or its shards) in an HF model directory."""
    hf_dir = _model_dir(hf_dir)
    return _read_json(hf_dir / "config.json"), _read_tensors(hf_dir)


def load_hf(spec: str | Path, hf_dir: str | Path, arch: str | None = None, *, kernels: dict[str, str] | None = None,
            disable: tuple[str, ...] = (), on_stage: Callable | None = None, **overrides: Any):
    """Compile `spec` with parameters from `hf_dir/config.json` (then `overrides`), build the model and
    load `hf_dir/model.safetensors` into it strictly. `arch` defaults to config.json's model_type;
    `kernels`, `disable` and `on_stage` go to archc.compile. Returns (compiled, model in eval mode)."""
    loaded = load_for_convert(spec, hf_dir, arch, overrides, dict(kernels=kernels, disable=disable, on_stage=on_stage))
    return loaded.compiled, loaded.model


# ----------------------------------------------------------------------------
# Conversion


def _convert(arch: str, hf_state: dict[str, torch.Tensor], n_layers: int, tied: bool,
             expect: Mapping[str, Sequence[int]] | None = None, skipped_layers: range = range(0)):
    """(canonical tensors, canonical name -> the HF key it came from). Keys of `skipped_layers` are dropped."""
    spec_map = _arch(arch)
    rules = {**spec_map.keys, **(spec_map.tied if tied else {})}
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    seen: set[str] = set()
    unknown, problems, copies = [], [], []
    for key, tensor in hf_state.items():
        pattern, index = _pattern(key, spec_map, rules)
        if pattern in spec_map.ignored:
            continue
        layer = index[0] if index else None
        if layer is not None and layer in skipped_layers:
            continue  # a module the spec does not build, stored as extra layers
        if pattern not in rules or (expect is None and layer is not None and layer >= n_layers):
            unknown.append(key)
            continue
        seen.add(pattern.format(*index))
        rule = rules[pattern]
        if isinstance(rule, Tied):
            copies.append((key, tensor, rule.target))
            continue
        try:
            parts = _apply(rule, key, tensor, index)
        except WeightsError as err:
            problems.append(str(err))
            continue
        if expect is not None:
            stray = [name for name in parts if name not in expect]
            if len(stray) == len(parts):  # e.g. a layer past n_layers, or an MoE key in a dense layer
                unknown.append(key)
                continue
            if stray:
                problems.append(f"{key} gives {', '.join(stray)}, which the model does not have")
                continue
        for name, part in parts.items():
            if name in out:  # e.g. a checkpoint holding keys both with and without the base prefix
                problems.append(f"{key} and {sources[name]} both give {name}")
            out[name] = part.contiguous()  # transposed views would not save as safetensors
            sources[name] = key
    for key, tensor, target in copies:
        if target in out and not torch.equal(tensor, out[target]):
            problems.append(f"{key} differs from {sources[target]}, but the spec ties them (one weight)")
    if expect is not None:
        missing = _hf_keys([name for name in expect if name not in out], rules)
    elif spec_map.uniform:
        missing = [k for k in _expected(rules, n_layers) if k not in seen]
    else:
        missing = []
    if unknown or missing or problems:
        lines = [f"the checkpoint does not fit the {arch} key map (n_layers={n_layers}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unknown:
            lines.append(f"  unexpected ({len(unknown)}): " + ", ".join(unknown))
        lines += [f"  {p}" for p in problems]
        raise WeightsError("\n".join(lines))
    return out, sources


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _pattern(key: str, spec_map: ArchMap, rules: dict[str, Rule]) -> tuple[str, tuple[int, ...]]:
    """The key map pattern of `key` and its indices ("h.3.ln_1.weight" -> "h.{}.ln_1.weight", (3,);
    "model.layers.1.mlp.experts.7.w1.weight" -> "model.layers.{}.mlp.experts.{}.w1.weight", (1, 7))."""
    index = tuple(int(i) for i in _INDEX.findall(key))
    pattern = _INDEX.sub("{}", key)
    known = rules.keys() | set(spec_map.ignored)
    if pattern not in known and spec_map.base_prefix + pattern in known:
        pattern = spec_map.base_prefix + pattern
    return pattern, index


def _apply(rule: Rule, key: str, tensor: torch.Tensor, index: tuple[int, ...]) -> dict[str, torch.Tensor]:
    if isinstance(rule, str):
        return {rule.format(*index): tensor}
    if isinstance(rule, Transpose):
        if tensor.dim() != 2:
            raise WeightsError(f"{key}: expected a 2-D weight, got shape {list(tensor.shape)}")
        return {rule.target.format(*index): tensor.t()}
    if isinstance(rule, Unstack):
        if tensor.dim() < 2:
            raise WeightsError(f"{key}: expected experts stacked on dim 0, got shape {list(tensor.shape)}")
        out: dict[str, torch.Tensor] = {}
        for e, piece in enumerate(tensor.unbind(0)):
            out.update(_cut(rule.targets, key, piece, rule.dim, rule.transpose, (*index, e)))
        return out
    return _cut(rule.targets, key, tensor, rule.dim, rule.transpose, index)


def _cut(targets: tuple[str, ...], key: str, tensor: torch.Tensor, dim: int, transpose: bool,
         index: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """`tensor` cut into len(targets) equal parts along `dim` (a single target takes it whole)."""
    count = len(targets)
    if tensor.dim() <= dim or tensor.shape[dim] % count:
        raise WeightsError(f"{key}: shape {list(tensor.shape)} does not split into {count} equal parts "
                           f"along dim {dim}")
    parts = tensor.chunk(count, dim=dim)
    return {t.format(*index): (p.t() if transpose else p) for t, p in zip(targets, parts)}


def _expected(rules: dict[str, Rule], n_layers: int) -> list[str]:
    """Every HF key the checkpoint must hold when every pattern occurs in every layer (tied copies
    are optional: safetensors stores one)."""
    keys = []
    for pattern, rule in rules.items():
        if not isinstance(rule, Tied):
            keys += [pattern.format(i) for i in range(n_layers)] if "{}" in pattern else [pattern]
    return keys


def _hf_keys(names: list[str], rules: dict[str, Rule]) -> list[str]:
    """The HF keys that would give these canonical names (the first layout a map lists), in order."""
    templates = []
    for pattern, rule in rules.items():
        if isinstance(rule, Tied):
            continue
        targets = [rule] if isinstance(rule, str) else [rule.target] if isinstance(rule, Transpose) else rule.targets
        for target in targets:
            regex = re.compile(re.escape(target).replace(re.escape("{}"), r"(\d+)") + r"\Z")
            templates.append((regex, pattern))
    keys: dict[str, None] = {}
    for name in names:
        for regex, pattern in templates:
            match = regex.match(name)
            if match:
                keys[pattern.format(*match.groups())] = None  # an Unstack key ignores the expert index
                break
        else:
            keys[f"{name} (no Hugging Face key maps to it)"] = None
    return list(keys)


# ----------------------------------------------------------------------------
# Loading


@attrs.frozen
class _Loaded:
    compiled: Any
    model: torch.nn.Module
    arch: str
    derived: dict[str, Any]  # parameters taken from config.json
    n_hf_tensors: int


def load_for_convert(spec, hf_dir, arch, overrides: dict[str, Any], compile_kw: dict[str, Any]) -> _Loaded:
    import archc

    # Config and spec first: a checkpoint that cannot fit fails before gigabytes of tensors are read.
    hf_dir = _model_dir(hf_dir)
    config = _read_json(hf_dir / "config.json")
    arch = arch or config.get("model_type")
    if arch is None:
        raise SpecError(f"{hf_dir / 'config.json'} has no model_type", hint=f"pass --arch ({', '.join(ARCHS)})")
    derived = hf_overrides(arch, config)
    try:
        compiled = archc.compile(spec, {**derived, **overrides}, **compile_kw)
    except SpecError as err:  # say where parameters the user never typed came from
        note = "parameters from config.json: " + ", ".join(f"{k}={v!r}" for k, v in derived.items())
        raise SpecError(err.message, err.span, hint=err.hint, notes=(*err.notes, (note, None))) from None
    model = compiled.build()
    expect = expected_weights(compiled, model)
    extra_field = _arch(arch).extra_layers
    skipped = range(0)
    if extra_field and config.get(extra_field):  # they follow the checkpoint's layers, whatever -D n_layers says
        skipped = range(config["num_hidden_layers"], config["num_hidden_layers"] + int(config[extra_field]))
    hf_state = _read_tensors(hf_dir)
    tensors, sources = _convert(arch, hf_state, compiled.params["n_layers"],
                                compiled.params.get("tie_embeddings", False), expect, skipped)
    _check_shapes(tensors, sources, hf_state, expect)
    load_canonical(model, compiled, tensors, strict=True)  # also catches layer-count and tying mismatches
    return _Loaded(compiled, model.eval(), arch, derived, len(hf_state))


def _check_shapes(tensors: dict[str, torch.Tensor], sources: dict[str, str], hf_state: dict[str, torch.Tensor],
                  expected: Mapping[str, Sequence[int]]) -> None:
    """Name the HF key behind each mis-shaped weight (load_canonical only knows the canonical name)."""
    bad = [f"  {sources[name]} {list(hf_state[sources[name]].shape)} -> {name} {list(t.shape)}: "
           f"the model expects {list(expected[name])}"
           for name, t in tensors.items() if name in expected and tuple(t.shape) != tuple(expected[name])]
    if bad:
        raise WeightsError("shape mismatch (HF key [shape] -> archc name [shape]):\n" + "\n".join(bad))


def _model_dir(hf_dir: str | Path) -> Path:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise WeightsError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    return hf_dir


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found (a Hugging Face model directory has a config.json)") from None
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None


def _read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():  # a sharded checkpoint: the index maps each key to its shard file
        shards = set(_read_json(index).get("weight_map", {}).values())
        if any(Path(s).name != s for s in shards):
            raise WeightsError(f"{index}: shard names must be files in {hf_dir}")
        files = [hf_dir / s for s in sorted(shards)]
    else:
        raise WeightsError(f"{hf_dir}: no model.safetensors (pickled pytorch_model.bin files are never read; "
                           "convert them to safetensors first)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(path))  # safetensors only: loading cannot execute code
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: cannot read safetensors ({err})") from None
    return state


def save_converted(model: torch.nn.Module, compiled, path: Path) -> None:
    """save_model (it handles tied weights), atomically: a failed write never replaces a good file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_model(model, tmp, metadata={"format": "pt", "archc.params": json.dumps(compiled.params)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
