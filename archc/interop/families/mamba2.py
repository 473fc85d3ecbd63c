"""Mamba-2 (specs/mamba2.arch), transformers' Mamba2ForCausalLM: in_proj is z | x | B | C | dt side by
side (cut by the model's sizes), the depthwise conv runs over x | B | C, and the gated RMSNorm is per
group of heads, as the spec's ssd."""

from __future__ import annotations

import math

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, Split, Tied, WeightMap

MIXER, OURS = "backbone.layers.{}.mixer", "layers.{}.mixer"

KEYS = {
    "backbone.embeddings.weight": "embed.weight",
    "backbone.layers.{}.norm.weight": "layers.{}.norm.weight",
    f"{MIXER}.in_proj.weight": Split([f"{OURS}.{p}.weight" for p in ("z", "x", "b", "c", "dt")]),
    f"{MIXER}.conv1d.weight": f"{OURS}.core.conv1d.weight",
    f"{MIXER}.conv1d.bias": f"{OURS}.core.conv1d.bias",
    f"{MIXER}.dt_bias": f"{OURS}.core.dt_bias",
    f"{MIXER}.A_log": f"{OURS}.core.A_log",
    f"{MIXER}.D": f"{OURS}.core.D",
    f"{MIXER}.norm.weight": f"{OURS}.core.norm.weight",
    f"{MIXER}.out_proj.weight": f"{OURS}.o.weight",
    "backbone.norm_f.weight": "norm_f.weight",
    "lm_head.weight": Tied("embed.weight", untied="head.weight", flag="tie_word_embeddings"),
}


def _mamba2(c: dict) -> dict:
    head_dim = c["expand"] * c["hidden_size"] // c["num_heads"]
    if c.get("head_dim") != head_dim or head_dim * c["num_heads"] != c["expand"] * c["hidden_size"]:
        refuse(c, "head_dim", f"the spec's heads split expand * hidden_size = {c['expand'] * c['hidden_size']} "
                              f"into num_heads = {c['num_heads']}")
    return {}


def _export(params: dict) -> dict:
    return {"head_dim": params["expand"] * params["d_model"] // params["n_heads"]}


MAMBA2 = WeightMap(
    model_type="mamba2", architecture="Mamba2ForCausalLM", base_prefix="backbone.", keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                "num_heads": "n_heads", "state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand",
                "n_groups": "n_groups", "layer_norm_epsilon": "eps"},
        optional={"tie_word_embeddings": "tie_embeddings"},
        positive=("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size",
                  "conv_kernel", "expand", "n_groups"),
        # transformers' Mamba2Config defaults
        defaults={"num_heads": 128, "head_dim": 64, "state_size": 128, "layer_norm_epsilon": 1e-5, "expand": 2,
                  "conv_kernel": 4, "n_groups": 8, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
                  "time_step_limit": (0.0, math.inf), "tie_word_embeddings": False},
        require={"use_bias": Only(False, why="the spec's in and out projections have no bias"),
                 "use_conv_bias": Only(True, why="the spec's convolution has a bias"),
                 "hidden_act": Only("silu", why="the spec's convolution and gate use silu"),
                 "time_step_limit": Only((0.0, math.inf), why="the spec does not clamp dt")},
        prepare=_mamba2, export=_export,
    ),
)
