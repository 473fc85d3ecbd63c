"""GPT-2 (specs/gpt2.arch): learned positions, Conv1D weights stored [in, out], fused q|k|v, tied head."""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, Split, Tied, Transpose, WeightMap


def _qkv(suffix: str) -> list[str]:
    return [f"h.{{}}.attn.{part}.{suffix}" for part in ("q", "k", "v")]


KEYS = {
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
    "lm_head.weight": Tied("wte.weight", flag="tie_word_embeddings"),  # the spec always ties the head to wte
}


def _gpt2(c: dict) -> dict:
    if c["n_inner"] not in (None, 4 * c["n_embd"]):
        refuse(c, "n_inner", "the spec's MLP width is 4 * n_embd")
    return {}


GPT2 = WeightMap(
    model_type="gpt2", architecture="GPT2LMHeadModel", base_prefix="transformer.",
    ignored=("transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias"),  # buffers older versions saved
    keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "n_positions": "max_len", "n_embd": "d_model", "n_layer": "n_layers",
                "n_head": "n_heads", "layer_norm_epsilon": "eps"},
        positive=("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"),
        defaults={"layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None,
                  "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                  "tie_word_embeddings": True},
        require={
            "activation_function": Only("gelu_new", "gelu_pytorch_tanh",
                                        why="the spec's MLP uses tanh-approximated GELU"),
            "scale_attn_weights": Only(True, why="the spec scales attention by 1/sqrt(head_dim)"),
            "scale_attn_by_inverse_layer_idx": Only(False, why="the spec does not scale attention per layer"),
            "add_cross_attention": Only(False, why="the spec has no cross-attention"),
        },
        prepare=_gpt2,
        ignore=("dropout",),  # a training choice, not part of a checkpoint: the spec's default stays
    ),
)
