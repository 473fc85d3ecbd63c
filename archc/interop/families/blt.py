"""The Byte Latent Transformer (specs/blt.arch, its entropy model specs/blt_entropy.arch), transformers'
BltForCausalLM with its entropy patcher (patch_in_forward).

The checkpoint's parts are four sub-configs (encoder_config, decoder_config, global_config, patcher_config),
read by `_blt` into the spec's parameters: the local encoder and decoder share the spec's local sizes, so
transformers' two must agree; the patcher's sizes become the used entropy spec's (`blt_entropy.e_dim`, ...),
so the released 768 × 14 patcher loads. Its cross-attention returns x + attn(x) and the caller adds x again: the
spec's reference_residual. Its RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...: q and k rows are
reordered to rotate-half.
Its entropy patcher is the spec's `patch` (global threshold): starts at bytes 0 and 1, then where the
entropy before exceeds patching_threshold, the byte after the window included (transformers then has an
empty last patch, the spec a patch holding only that byte; the logits are the same). transformers splits
long patches (max_patch_length) before the byte after the window is counted, the reference and the spec
after: the last byte's logits could differ, so only max_patch_length null is read.
"""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, PermuteRotary, Rename, WeightMap

# A max_patch_length no patch reaches (a patch is at most the window plus one byte): the spec's split is then
# the identity, as transformers' null.
NO_LIMIT = 2**31 - 1

# The entropy model blt.arch runs is blt_entropy.arch's, sized by that file's parameters (`blt_entropy.e_dim`
# and so on: a used file's parameters, by qualified name); its RoPE base and vocabulary are fixed there.
ENTROPY = {"rope_theta": 10000.0, "vocab_size": 260}


def layer_keys(hf: str, ours: str, heads: int | str) -> dict:
    """A transformer layer (self-attention with interleaved RoPE, SwiGLU) of `heads` heads."""
    keys = {f"{hf}.self_attn.{n}_proj.weight": Rename(f"{ours}.attention.{n}.weight", PermuteRotary(heads))
            for n in "qk"}
    keys.update({f"{hf}.self_attn.v_proj.weight": f"{ours}.attention.v.weight",
                 f"{hf}.self_attn.o_proj.weight": f"{ours}.attention.o.weight",
                 f"{hf}.input_layernorm.weight": f"{ours}.attention_norm.weight",
                 f"{hf}.post_attention_layernorm.weight": f"{ours}.ffn_norm.weight"})
    keys.update({f"{hf}.mlp.{n}_proj.weight": f"{ours}.feed_forward.{n}.weight" for n in ("gate", "up", "down")})
    return keys


def cross_keys(hf: str, ours: str) -> dict:
    """A patch cross-attention: RMSNorms on queries and keys/values, no positions."""
    keys = {f"{hf}.{n}_proj.weight": f"{ours}.{n}.weight" for n in "qkvo"}
    keys.update({f"{hf}.{n}_norm.weight": f"{ours}.{n}_norm.weight" for n in "qk"})
    return keys


KEYS = {
    "model.patcher.embed_tokens.weight": "entropy_model.tok_embeddings.weight",
    **layer_keys("model.patcher.layers.{}", "entropy_model.layers.{}", "blt_entropy.e_heads"),
    "model.patcher.norm.weight": "entropy_model.norm.weight",
    "model.patcher.lm_head.weight": "entropy_model.output.weight",
    "model.local_encoder.embed_tokens.weight": "tok_embeddings.weight",
    "model.encoder_hash_tok_embedding.weight": "hash_embeddings.table.weight",
    **layer_keys("model.local_encoder.layers.{}", "encoder_layers.{}", "local_heads"),
    "model.local_encoder.patch_embedding_projection.weight": "patch_embedding_projection.weight",
    **cross_keys("model.local_encoder.cross_attn_layers.0", "encoder_cross_attention"),  # the last layer's only
    "model.global_transformer.token_embedding_projection.weight": "token_embedding_projection.weight",
    **layer_keys("model.global_transformer.layers.{}", "global_layers.{}", "global_heads"),
    "model.local_decoder.patch_embedding_projection.weight": "decoder_patch_projection.weight",
    **cross_keys("model.local_decoder.cross_attn_layers.{}", "decoder_layers.{}.cross_attention"),
    **layer_keys("model.local_decoder.layers.{}", "decoder_layers.{}.layer", "local_heads"),
    "model.local_decoder.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

# Each part's fields -> spec parameters (the first part to name a parameter sets it, the others must agree);
# the patcher's go to the used entropy spec's parameters.
PARTS = {
    "encoder_config": {"hidden_size": "d_local", "num_attention_heads": "local_heads", "intermediate_size":
                       "local_hidden", "num_hidden_layers": "encoder_layers", "rms_norm_eps": "eps",
                       "rope_theta": "rope_theta"},
    "decoder_config": {"hidden_size": "d_local", "num_attention_heads": "local_heads", "intermediate_size":
                       "local_hidden", "num_hidden_layers": "decoder_layers", "rms_norm_eps": "eps",
                       "rope_theta": "rope_theta", "hidden_size_global": "d_global"},
    "global_config": {"hidden_size": "d_global", "num_attention_heads": "global_heads", "intermediate_size":
                      "global_hidden", "num_hidden_layers": "global_layers", "rms_norm_eps": "eps",
                      "rope_theta": "rope_theta"},
    "patcher_config": {"hidden_size": "blt_entropy.e_dim", "num_attention_heads": "blt_entropy.e_heads",
                       "num_hidden_layers": "blt_entropy.e_layers", "intermediate_size": "blt_entropy.e_hidden",
                       "sliding_window": "blt_entropy.e_window", "rms_norm_eps": "blt_entropy.e_eps"},
}
FLOATS = ("eps", "rope_theta", "blt_entropy.e_eps")
# transformers' defaults of each part, for the fields a config.json may omit
DEFAULTS = {
    "encoder_config": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 1, "rms_norm_eps": 1e-5,
                       "rope_theta": 500000.0, "cross_attn_all_layers": False, "hidden_act": "silu"},
    "decoder_config": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 9, "rms_norm_eps": 1e-5,
                       "rope_theta": 500000.0, "intermediate_size": 2816, "hidden_size_global": 2048,
                       "cross_attn_all_layers": True, "hidden_act": "silu", "vocab_size": 260},
    "global_config": {"hidden_size": 2048, "num_attention_heads": 16, "num_hidden_layers": 25, "rms_norm_eps": 1e-5,
                      "rope_theta": 500000.0, "intermediate_size": 5632, "hidden_act": "silu"},
    "patcher_config": {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 14, "rms_norm_eps": 1e-5,
                       "rope_theta": 10000.0, "intermediate_size": 2048, "sliding_window": 512, "vocab_size": 260},
}
BYTES = (260, "the spec's byte vocabulary is 256 bytes + 4 specials")
# Fields whose other values the spec cannot compute, and why.
REQUIRE = {
    "encoder_config": {"cross_attn_all_layers": (False, "the spec's encoder cross-attends after its last layer "
                                                        "(transformers recomputes the patches after every layer, so "
                                                        "only the last counts, but keeps the others' weights)")},
    "decoder_config": {"cross_attn_all_layers": (True, "the spec's decoder cross-attends before every layer"),
                       "vocab_size": BYTES},
    "patcher_config": {"rope_theta": (ENTROPY["rope_theta"], "blt_entropy.arch's RoPE base is 10000"),
                       "vocab_size": BYTES},
}


def _part(c: dict, name: str) -> dict:
    """A sub-config with transformers' defaults (and its rope_parameters' theta as `rope_theta`)."""
    part = c.get(name) or {}
    if not isinstance(part, dict):
        refuse(c, name, "expected a JSON object (transformers' sub-config)")
    part = {**DEFAULTS[name], **{k: v for k, v in part.items() if v is not None}}
    rope = part.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        refuse(c, f"{name}.rope_parameters.rope_type", "the spec's RoPE is unscaled", rope["rope_type"])
    part["rope_theta"] = rope.get("rope_theta", part["rope_theta"])
    if "intermediate_size" not in part:  # transformers' default for the encoder
        part["intermediate_size"] = int(8 * part["hidden_size"] / 3)
    heads = part.get("num_key_value_heads")
    if heads not in (None, part["num_attention_heads"]):
        refuse(c, f"{name}.num_key_value_heads", "the spec's BLT attention has one key and value per head", heads)
    if part.get("hidden_act", "silu") != "silu":
        refuse(c, f"{name}.hidden_act", "the spec's MLPs are SwiGLU (silu)", part["hidden_act"])
    return part


def _blt(c: dict) -> dict:
    """The spec parameters the four sub-configs give, and the options transformers' BLT computes with."""
    window = c.get("local_attention_window_len")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        refuse(c, "local_attention_window_len", "the spec's local layers attend within a window (a positive "
               "integer; one at least as long as the sequences is full causal attention)", window)
    out: dict = {}
    for name, fields in PARTS.items():
        part = _part(c, name)
        for field, (value, why) in REQUIRE.get(name, {}).items():
            if part.get(field) != value:
                refuse(c, f"{name}.{field}", why, part.get(field))
        if part.get("cross_attn_k", c["cross_attn_k"]) != c["cross_attn_k"]:
            refuse(c, f"{name}.cross_attn_k", f"the spec has one k (cross_attn_k is {c['cross_attn_k']!r})",
                   part["cross_attn_k"])
        for field, param in fields.items():
            value = part.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                    isinstance(value, float) and param not in FLOATS:
                refuse(c, f"{name}.{field}", "expected a positive " + ("number" if param in FLOATS else "integer"),
                       value)
            if param in out and out[param] != value:
                refuse(c, f"{name}.{field}", f"the spec has one {param} ({out[param]!r} from another part)", value)
            out[param] = float(value) if param in FLOATS else value
    out.update(reference_residual=True, max_patch_length=NO_LIMIT)
    return out


def _export(params: dict) -> dict:
    """The sub-configs of `params` (the inverse of `_blt`)."""
    def part(name: str, **extra) -> dict:
        fields = {f: params[p] for f, p in PARTS[name].items()}
        fields.update({f: v for f, (v, _why) in REQUIRE.get(name, {}).items()})
        theta = fields.pop("rope_theta")
        return {**fields, "num_key_value_heads": fields["num_attention_heads"], "hidden_act": "silu",
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}, **extra}

    return {"encoder_config": part("encoder_config", cross_attn_k=params["k"], sliding_window=params["window"]),
            "decoder_config": part("decoder_config", cross_attn_k=params["k"]),
            "global_config": part("global_config"), "patcher_config": part("patcher_config")}


BLT = WeightMap(
    model_type="blt", architecture="BltForCausalLM", keys=KEYS,
    config=Config(
        params={"encoder_hash_byte_group_vocab": "buckets", "patching_threshold": "threshold", "cross_attn_k": "k",
                "local_attention_window_len": "window"},
        positive=("encoder_hash_byte_group_vocab", "cross_attn_k"),
        # transformers' BltConfig defaults
        defaults={"vocab_size": 260, "patch_in_forward": True, "patching_mode": "entropy",
                  "patching_threshold": 1.335442066192627, "max_patch_length": None, "cross_attn_k": 2,
                  "local_attention_window_len": 512, "encoder_hash_byte_group_size": [3, 4, 5, 6, 7, 8],
                  "encoder_hash_byte_group_vocab": 500002, "encoder_hash_byte_group_nb_functions": 1,
                  "tie_word_embeddings": False},
        require={"vocab_size": Only(BYTES[0], why=BYTES[1]),
                 "patch_in_forward": Only(True, why="the spec patches with its entropy model (the checkpoint's "
                                                    "patcher)"),
                 "patching_mode": Only("entropy", why="the spec's patches come from the entropy model"),
                 "max_patch_length": Only(None, why="transformers splits long patches before counting the byte "
                                                    "after the window, the spec (as the reference) after, so "
                                                    "the last byte's logits differ"),
                 "encoder_hash_byte_group_size": Only([3, 4, 5, 6, 7, 8], why="the spec hashes n-grams of 3 to 8 "
                                                                              "bytes"),
                 "encoder_hash_byte_group_nb_functions": Only(1, why="the spec has one hash function"),
                 "tie_word_embeddings": Only(False, why="the spec's output head has its own weight")},
        prepare=_blt, export=_export,
    ),
)
