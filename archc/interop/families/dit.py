"""diffusers' DiTTransformer2DModel (specs/dit.arch with learn_sigma, block_condition, freq_shift and
mlp_norm_eps as its config gives them). A diffusers directory holds config.json (its `_class_name`
names the family) and diffusion_pytorch_model.safetensors.

The port differs from facebookresearch/DiT in ways the spec takes as parameters: every block embeds
(time, label) with weights of its own and the final layer uses block 0's (`block_condition`), the
timestep features use downscale_freq_shift=1 (`freq_shift`), the MLP's LayerNorm has eps `norm_eps`
(`mlp_norm_eps`), and out_channels = 2·in_channels is DiT's learned variance (`learn_sigma`). The patch
embedding is a Conv2d, the spec's a linear on `patchify`'s tokens (PatchConv). Its 2-D sin-cos table
is a buffer diffusers does not save: the spec computes the same one.
"""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, PatchConv, Rename, WeightMap

BLOCK, OURS = "transformer_blocks.{}", "blocks.{}"
EMB = f"{BLOCK}.norm1.emb"


def _both(hf: str, ours: str) -> dict:
    return {f"{hf}.{p}": f"{ours}.{p}" for p in ("weight", "bias")}


KEYS = {
    "pos_embed.proj.weight": Rename("x_embedder.weight", PatchConv("patch")),
    "pos_embed.proj.bias": "x_embedder.bias",
    **_both(f"{EMB}.timestep_embedder.linear_1", f"{OURS}.condition.t_embedder_in"),
    **_both(f"{EMB}.timestep_embedder.linear_2", f"{OURS}.condition.t_embedder_out"),
    f"{EMB}.class_embedder.embedding_table.weight": f"{OURS}.condition.y_embedder.weight",
    **_both(f"{BLOCK}.norm1.linear", f"{OURS}.dit.adaLN_modulation"),
    **{k: v for n in "qkv" for k, v in _both(f"{BLOCK}.attn1.to_{n}", f"{OURS}.dit.attn.{n}").items()},
    **_both(f"{BLOCK}.attn1.to_out.0", f"{OURS}.dit.attn.o"),
    **_both(f"{BLOCK}.ff.net.0.proj", f"{OURS}.dit.mlp.fc"),
    **_both(f"{BLOCK}.ff.net.2", f"{OURS}.dit.mlp.proj"),
    **_both("proj_out_1", "final_layer.adaLN_modulation"),
    **_both("proj_out_2", "final_layer.linear"),
}


def _dit(c: dict) -> dict:
    channels = c["in_channels"]
    out = c.get("out_channels")
    if out not in (None, channels, 2 * channels):
        refuse(c, "out_channels", f"the spec outputs in_channels ({channels}) or, with the learned variance, "
               f"2·in_channels ({2 * channels}) channels")
    if c["sample_size"] % c["patch_size"]:
        refuse(c, "sample_size", f"the spec's patches ({c['patch_size']}×{c['patch_size']}) must tile the image")
    return {"d_model": c["num_attention_heads"] * c["attention_head_dim"], "learn_sigma": out == 2 * channels,
            "block_condition": True, "freq_shift": 1.0, "mlp_ratio": 4, "freq_dim": 256}


DIT = WeightMap(
    model_type="DiTTransformer2DModel", architecture="DiTTransformer2DModel", library="diffusers",
    keys=KEYS,
    config=Config(
        params={"in_channels": "channels", "num_layers": "n_layers", "num_attention_heads": "n_heads",
                "sample_size": "image_size", "patch_size": "patch", "num_embeds_ada_norm": "n_classes",
                "norm_eps": "mlp_norm_eps"},
        positive=("in_channels", "num_layers", "num_attention_heads", "attention_head_dim", "sample_size",
                  "patch_size", "num_embeds_ada_norm"),
        defaults={"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
                  "num_layers": 28, "sample_size": 32, "patch_size": 2, "activation_fn": "gelu-approximate",
                  "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
                  "norm_eps": 1e-5, "attention_bias": True, "upcast_attention": False},
        require={
            "norm_type": Only("ada_norm_zero", why="the spec's blocks are adaLN-Zero"),
            "activation_fn": Only("gelu-approximate", why="the spec's MLP uses tanh-approximated GELU"),
            "attention_bias": Only(True, why="the spec's attention projections have biases"),
            "norm_elementwise_affine": Only(False, why="the spec's LayerNorms have no affine weights"),
            "upcast_attention": Only(False, why="the spec's attention runs in the model's dtype"),
        },
        prepare=_dit,
        ignore=("class_dropout", "objective", "schedule"),  # training choices: not in a checkpoint
    ),
)
