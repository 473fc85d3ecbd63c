"""ViT (specs/vit.arch), transformers' ViTForImageClassification: a strided convolution cutting patches,
a learned [CLS] token and position embeddings, pre-norm layers with q, k, v biases, a classifier on [CLS]."""

from __future__ import annotations

from archc.interop.hfconfig import refuse
from archc.interop.maps import Config, Only, WeightMap

LAYER, OURS = "vit.encoder.layer.{}", "layers.{}"

KEYS = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "position_embeddings",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embeddings.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embeddings.bias",
    **{f"{LAYER}.{theirs}.{p}": f"{OURS}.{ours}.{p}" for theirs, ours in (
        ("attention.attention.query", "attention.q"), ("attention.attention.key", "attention.k"),
        ("attention.attention.value", "attention.v"), ("attention.output.dense", "attention.o"),
        ("layernorm_before", "layernorm_before"), ("layernorm_after", "layernorm_after"),
        ("intermediate.dense", "mlp.fc"), ("output.dense", "mlp.proj")) for p in ("weight", "bias")},
    "vit.layernorm.weight": "layernorm.weight",
    "vit.layernorm.bias": "layernorm.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}


def _vit(c: dict) -> dict:
    labels = c.get("id2label")
    if not isinstance(labels, dict) or not labels:
        refuse(c, "id2label", "the classifier's width is the number of labels; config.json must list them")
    if c["image_size"] % c["patch_size"]:
        refuse(c, "image_size", f"the spec cuts the image into whole patches of {c['patch_size']}")
    return {"n_labels": len(labels)}


def _export(params: dict) -> dict:
    labels = {str(i): f"LABEL_{i}" for i in range(params["n_labels"])}
    return {"id2label": labels, "label2id": {name: i for i, name in enumerate(labels.values())}}


VIT = WeightMap(
    model_type="vit", architecture="ViTForImageClassification", keys=KEYS,
    config=Config(
        params={"image_size": "image_size", "patch_size": "patch", "num_channels": "channels",
                "hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                "intermediate_size": "d_ff", "layer_norm_eps": "eps"},
        positive=("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "intermediate_size"),
        # transformers' ViTConfig defaults
        defaults={"hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True, "num_channels": 3},
        require={"hidden_act": Only("gelu", why="the spec's MLP uses erf GELU"),
                 "qkv_bias": Only(True, why="the spec's attention has q, k, v biases")},
        prepare=_vit, export=_export,
        ignore=("dropout_rate",),
    ),
)
