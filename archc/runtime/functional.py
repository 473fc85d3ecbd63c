"""Small layers and functions that generated modules call (imported there as `AF`)."""

from __future__ import annotations

from torch import nn

from archc.kernels.attention import (  # noqa: F401
    attention_auto,
    attention_flex,
    attention_local,
    attention_math,
    attention_sdpa_mask,
)
from archc.runtime.attention_bias import score_bias  # noqa: F401
from archc.runtime.decoding import KVCache, LearnedPositions  # noqa: F401
from archc.runtime.diffusion import (  # noqa: F401
    MSRotaryEmbedding,
    crop_position_embedding,
    drop_condition,
    mean_flat_loss,
    named_objective,
    noise_for_training,
    patchify,
    sincos_2d_position_embedding,
    timestep_embedding,
    unpatchify,
)
from archc.runtime.engram import Engram  # noqa: F401
from archc.runtime.gated import branch_gates, mix_branches, routed_rows  # noqa: F401
from archc.runtime.lanes import Lanes, expand_lanes, merge_lanes  # noqa: F401
from archc.runtime.mixers import GatedDeltaNetCore, KDACore, LinearAttentionCore, SSDCore  # noqa: F401
from archc.runtime.moe import GroupedLinear, Router, Routing, combine_rows, dispatch_rows, moe_aux_loss  # noqa: F401
from archc.runtime.nsa import NSABranchCore, NSACore  # noqa: F401
from archc.runtime.params import Bias, Init, chosen, initialised, learned  # noqa: F401
from archc.runtime.patching import (  # noqa: F401
    HashNgramEmbedding,
    Patcher,
    decoder_cross_mask,
    decoder_patch_ids,
    encoder_cross_mask,
    entropy,
    masked_attention,
    patch_ids_from_lengths,
    patch_reduce,
    unpatch,
)
from archc.runtime.position_bias import ALiBi, RelativePositionBias  # noqa: F401
from archc.runtime.rope import (  # noqa: F401
    InterleavedRotaryEmbedding,
    Llama3RopeScaling,
    RotaryEmbedding,
    YarnRopeScaling,
    apply_rope,
    rotate_half,
)
from archc.runtime.tensors import Positions, drop_path, shift  # noqa: F401


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02) weights for linears, embeddings and stacked experts, zero biases;
    tensors the spec gave an `init=` keep theirs."""
    if isinstance(module, (nn.Linear, nn.Embedding, GroupedLinear)) and not chosen(module.weight):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None and not chosen(module.bias):
        nn.init.zeros_(module.bias)
