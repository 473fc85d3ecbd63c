"""SD3's MMDiT (diffusers' SD3Transformer2DModel) into specs/sd3.arch, SD3's interface around the blocks of
specs/mmdit.arch (whose sizes, `mmdit.d_model` and `mmdit.n_heads`, the map sets with sd3.arch's own).

The spec names its modules after diffusers' where they are one module (pos_embed, context_embedder,
norm1, norm1_context, to_q … add_v_proj, to_add_out, norm_out, proj_out); elsewhere the map renames:
the patch convolution (`pos_embed.proj`), the time and pooled-text MLPs (`time_text_embed.*`), the
adaLN linears (`norm1.linear`), the image output projection (`attn.to_out.0`, in the spec beside the
attention, where its gate is) and the MLPs (`ff.net.0.proj`, `ff.net.2`): those positions in
diffusers' module lists are written literally in the key patterns (a number in a pattern matches only
itself). The last block's
`norm1_context` (context_pre_only: scale and shift only) has the same key with a third of the rows.

The position table: SD3 computes a `pos_embed_max_size`² sin-cos table with positions rescaled to
the base grid (`sample_size / patch_size`) and crops its centre to the image's patch grid; the spec's
`sincos_2d(..., base_size=pos_base, max_size=pos_max)` does the same, and diffusers' saved copy of the
table (`pos_embed.pos_embed`) is dropped. What the map refuses: SD3.5's QK-norm and dual attention, a
caption projection of another width, and other output channels.
"""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, WeightMap

_BLOCK = "transformer_blocks.{}"
_RENAMES = {
    "pos_embed.proj": "pos_embed",
    "time_text_embed.timestep_embedder.linear_1": "time_linear_1",
    "time_text_embed.timestep_embedder.linear_2": "time_linear_2",
    "time_text_embed.text_embedder.linear_1": "text_linear_1",
    "time_text_embed.text_embedder.linear_2": "text_linear_2",
    "context_embedder": "context_embedder",
    f"{_BLOCK}.norm1.linear": f"{_BLOCK}.norm1",
    f"{_BLOCK}.norm1_context.linear": f"{_BLOCK}.norm1_context",
    **{f"{_BLOCK}.attn.{name}": f"{_BLOCK}.attn.{name}"
       for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")},
    f"{_BLOCK}.attn.to_out.0": f"{_BLOCK}.to_out",
    f"{_BLOCK}.attn.to_add_out": f"{_BLOCK}.to_add_out",
    **{f"{_BLOCK}.{ff}.net.0.proj": f"{_BLOCK}.{ff}.fc" for ff in ("ff", "ff_context")},
    **{f"{_BLOCK}.{ff}.net.2": f"{_BLOCK}.{ff}.proj" for ff in ("ff", "ff_context")},
    "norm_out.linear": "norm_out",
    "proj_out": "proj_out",
}
KEYS = {f"{theirs}.{p}": f"{ours}.{p}" for theirs, ours in _RENAMES.items() for p in ("weight", "bias")}
def _sd3(c: dict) -> dict:
    width = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_projection_dim"] != width:
        refuse(c, "caption_projection_dim", f"the spec's text stream is as wide as the image stream ({width})")
    if c["out_channels"] not in (None, c["in_channels"]):
        refuse(c, "out_channels", "the spec predicts as many channels as it is given")
    grid = c["sample_size"] // c["patch_size"]
    return {"d_model": width, "mmdit.d_model": width, "image_height": c["sample_size"],
            "image_width": c["sample_size"], "pos_base": grid, "pos_max": c["pos_embed_max_size"] or grid}


def _export(params: dict) -> dict:
    return {"attention_head_dim": params["d_model"] // params["mmdit.n_heads"],
            "caption_projection_dim": params["d_model"],
            "sample_size": params["image_height"], "out_channels": params["channels"],
            "pos_embed_max_size": params["pos_max"]}


SD3 = WeightMap(
    model_type="SD3Transformer2DModel", architecture="SD3Transformer2DModel", library="diffusers",
    ignored=("pos_embed.pos_embed",),
    keys=KEYS,
    config=Config(
        params={"patch_size": "patch", "in_channels": "channels", "num_layers": "n_layers",
                "num_attention_heads": "mmdit.n_heads", "joint_attention_dim": "joint_dim",
                "pooled_projection_dim": "pooled_dim"},
        positive=("sample_size", "patch_size", "in_channels", "num_layers", "num_attention_heads",
                  "attention_head_dim", "joint_attention_dim", "pooled_projection_dim"),
        defaults={"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
                  "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
                  "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96,
                  "dual_attention_layers": (), "qk_norm": None},
        require={
            "qk_norm": Only(None, why="the spec's attention has no QK-norm (SD3.5's rms_norm)"),
            "dual_attention_layers": Only((), why="the spec's blocks have one attention (SD3.5's dual "
                                                      "attention layers are not built)"),
        },
        prepare=_sd3,
        export=_export,
    ),
)
