"""T5 (specs/t5.arch), transformers' T5ForConditionalGeneration: the original `relu` feed-forward or
v1.1's `gated-gelu` (Flan-T5), one shared embedding, the head tied to it or (v1.1's released
checkpoints) its own, no biases, one relative position table per stack (stored in its first block),
cross-attention in the decoder's second sub-layer.

Whether the decoder output is scaled by d_model ** -0.5: config.json's `scale_decoder_outputs`
(transformers 5 writes it, and ties the head always), else — older configs — exactly when the head is
tied, as transformers 4 did."""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, Tied, WeightMap

KEYS = {
    "shared.weight": "shared_embedding.weight",
    "lm_head.weight": Tied("shared_embedding.weight", untied="lm_head.weight", flag="tie_word_embeddings"),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder_position_bias.weight",
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder_position_bias.weight",
    **{f"{stack}.block.{{}}.layer.0.SelfAttention.{p}.weight": f"{stack}.{{}}.self_attention.{p}.weight"
       for stack in ("encoder", "decoder") for p in "qkvo"},
    **{f"{stack}.block.{{}}.layer.0.layer_norm.weight": f"{stack}.{{}}.layer_norm.weight"
       for stack in ("encoder", "decoder")},
    **{f"decoder.block.{{}}.layer.1.EncDecAttention.{p}.weight": f"decoder.{{}}.cross_attention.{p}.weight"
       for p in "qkvo"},
    "decoder.block.{}.layer.1.layer_norm.weight": "decoder.{}.cross_norm.weight",
    **{f"{stack}.block.{{}}.layer.{i}.DenseReluDense.{w}.weight": f"{stack}.{{}}.ff.{w}.weight"
       for stack, i in (("encoder", 1), ("decoder", 2)) for w in ("wi", "wi_0", "wi_1", "wo")},
    "encoder.block.{}.layer.1.layer_norm.weight": "encoder.{}.ff.layer_norm.weight",
    "decoder.block.{}.layer.2.layer_norm.weight": "decoder.{}.ff.layer_norm.weight",
    "encoder.final_layer_norm.weight": "encoder_norm.weight",
    "decoder.final_layer_norm.weight": "decoder_norm.weight",
}


def _t5(c: dict) -> dict:
    start = c.get("decoder_start_token_id", c["pad_token_id"])
    if start != c["pad_token_id"]:
        refuse(c, "decoder_start_token_id", f"the spec starts the decoder with pad ({c['pad_token_id']})")
    if c.get("num_decoder_layers") is None:
        c["num_decoder_layers"] = c["num_layers"]
    scale = c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True) is not False)
    return {"scale_decoder_output": bool(scale)}


def _export(params: dict) -> dict:
    return {"scale_decoder_outputs": params["scale_decoder_output"]}


T5 = WeightMap(
    model_type="t5", architecture="T5ForConditionalGeneration",
    ignored=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),  # copies of shared.weight
    keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "d_model": "d_model", "d_kv": "d_kv", "d_ff": "d_ff", "num_layers": "n_layers",
                "num_decoder_layers": "n_decoder_layers", "num_heads": "n_heads",
                "relative_attention_num_buckets": "buckets", "relative_attention_max_distance": "max_distance",
                "layer_norm_epsilon": "eps", "pad_token_id": "pad", "feed_forward_proj": "ff"},
        optional={"tie_word_embeddings": "tie_embeddings"},
        positive=("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance"),
        # transformers' T5Config defaults
        defaults={"feed_forward_proj": "relu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": True,
                  "pad_token_id": 0, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                  "num_decoder_layers": None},
        require={"feed_forward_proj": Only("relu", "gated-gelu", why="the spec's feed-forward is T5's relu MLP or "
                                                                      "v1.1's gated GELU (tanh)")},
        prepare=_t5, export=_export,
        ignore=("dropout_rate",),
    ),
)
