"""Gemma (specs/gemma.arch): GeGLU MLPs (tanh-approximated GELU), embeddings scaled by sqrt(d_model),
head_dim set apart from the width, the head tied to the embedding. Gemma's RMSNorm multiplies by
(1 + w) and stores w: the map adds 1 on import and takes it off on export."""

from __future__ import annotations

from archc.interop.families.llama import (
    DEFAULTS,
    NO_BIAS,
    PARAMS,
    POSITIVE,
    attention_keys,
    mlp_keys,
    norm_keys,
)
from archc.interop.maps import Add, Config, Only, Tied, WeightMap

KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    **norm_keys(Add(1.0)),
    **attention_keys(),
    **mlp_keys(),
    "lm_head.weight": Tied("embed.weight", flag="tie_word_embeddings"),
}

GEMMA = WeightMap(
    model_type="gemma", architecture="GemmaForCausalLM", base_prefix="model.", keys=KEYS,
    config=Config(
        params={**PARAMS, "head_dim": "head_dim"}, positive=POSITIVE, rope="rope_theta",
        defaults={**DEFAULTS, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                  "attention_bias": False, "use_bidirectional_attention": None},
        require={
            # transformers reads the "gelu" of the released configs as the tanh approximation
            "hidden_act": Only("gelu_pytorch_tanh", "gelu", "gelu_new",
                               why="the spec's MLP is GeGLU with tanh-approximated GELU"),
            "attention_bias": NO_BIAS,
            "use_bidirectional_attention": Only(None, False, why="the spec's attention is causal"),
        },
    ),
)
