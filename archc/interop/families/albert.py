"""ALBERT (specs/albert.arch), transformers' AlbertForMaskedLM: factorised embeddings projected to the
hidden width, ONE layer's weights shared by every layer, the MLM head tied to the word embeddings."""

from __future__ import annotations

from archc.interop.maps import Config, Only, Tied, WeightMap

LAYER = "albert.encoder.albert_layer_groups.0.albert_layers.0"

KEYS = {
    "albert.embeddings.word_embeddings.weight": "word_embeddings.weight",
    "albert.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "albert.embeddings.position_embeddings.weight": "position_embeddings.weight",
    "albert.embeddings.LayerNorm.weight": "embeddings_norm.weight",
    "albert.embeddings.LayerNorm.bias": "embeddings_norm.bias",
    "albert.encoder.embedding_hidden_mapping_in.weight": "embedding_hidden_mapping_in.weight",
    "albert.encoder.embedding_hidden_mapping_in.bias": "embedding_hidden_mapping_in.bias",
    **{f"{LAYER}.{theirs}.{p}": f"layer.{ours}.{p}" for theirs, ours in (
        ("attention.query", "attention.q"), ("attention.key", "attention.k"), ("attention.value", "attention.v"),
        ("attention.dense", "attention.o"), ("attention.LayerNorm", "attention_norm"), ("ffn", "ffn"),
        ("ffn_output", "ffn_output"), ("full_layer_layer_norm", "full_layer_layer_norm")) for p in ("weight", "bias")},
    "predictions.dense.weight": "dense.weight",
    "predictions.dense.bias": "dense.bias",
    "predictions.LayerNorm.weight": "predictions_norm.weight",
    "predictions.LayerNorm.bias": "predictions_norm.bias",
    "predictions.bias": "decoder.bias",
    "predictions.decoder.weight": Tied("word_embeddings.weight", flag="tie_word_embeddings"),
}

ALBERT = WeightMap(
    model_type="albert", architecture="AlbertForMaskedLM",
    ignored=("predictions.decoder.bias", "albert.embeddings.position_ids"),  # a copy of predictions.bias; a buffer
    keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "embedding_size": "d_embed", "hidden_size": "d_model",
                "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "intermediate_size": "d_ff",
                "max_position_embeddings": "max_len", "type_vocab_size": "type_vocab", "layer_norm_eps": "eps"},
        positive=("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size"),
        # transformers' AlbertConfig defaults
        defaults={"hidden_act": "gelu_new", "layer_norm_eps": 1e-12, "num_hidden_groups": 1, "inner_group_num": 1,
                  "tie_word_embeddings": True, "position_embedding_type": "absolute"},
        require={"hidden_act": Only("gelu_new", why="the spec's MLP uses tanh-approximated GELU"),
                 "num_hidden_groups": Only(1, why="the spec shares one layer among all layers"),
                 "inner_group_num": Only(1, why="the spec's shared group is one layer"),
                 "position_embedding_type": Only("absolute", why="the spec has learned absolute positions")},
        ignore=("dropout_rate",),
    ),
)
