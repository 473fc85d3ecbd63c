"""BERT (specs/bert.arch with head="mlm"), transformers' BertForMaskedLM: separate q, k, v with biases,
post-norm layers, the MLM head's transform, and a decoder tied to the word embeddings with its own bias."""

from __future__ import annotations

from archc.interop.maps import Config, Only, Tied, WeightMap

LAYER, OURS = "bert.encoder.layer.{}", "layers.{}"

KEYS = {
    "bert.embeddings.word_embeddings.weight": "word_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "position_embeddings.weight",
    "bert.embeddings.LayerNorm.weight": "embeddings_norm.weight",
    "bert.embeddings.LayerNorm.bias": "embeddings_norm.bias",
    **{f"{LAYER}.attention.self.{theirs}.{p}": f"{OURS}.attention.{ours}.{p}"
       for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")) for p in ("weight", "bias")},
    **{f"{LAYER}.{theirs}.{p}": f"{OURS}.{ours}.{p}" for theirs, ours in (
        ("attention.output.dense", "attention.o"), ("attention.output.LayerNorm", "attention_norm"),
        ("intermediate.dense", "intermediate"), ("output.dense", "output"), ("output.LayerNorm", "output_norm"))
       for p in ("weight", "bias")},
    "cls.predictions.transform.dense.weight": "transform.weight",
    "cls.predictions.transform.dense.bias": "transform.bias",
    "cls.predictions.transform.LayerNorm.weight": "transform_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "transform_norm.bias",
    "cls.predictions.bias": "decoder.bias",
    # the decoder's weight is the word embeddings' (save_pretrained leaves the copy out)
    "cls.predictions.decoder.weight": Tied("word_embeddings.weight", flag="tie_word_embeddings"),
}

BERT = WeightMap(
    model_type="bert", architecture="BertForMaskedLM",
    # a copy of cls.predictions.bias, and a buffer older versions saved
    ignored=("cls.predictions.decoder.bias", "bert.embeddings.position_ids"),
    keys=KEYS,
    config=Config(
        params={"vocab_size": "vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
                "num_attention_heads": "n_heads", "intermediate_size": "d_ff",
                "max_position_embeddings": "max_len", "type_vocab_size": "type_vocab", "layer_norm_eps": "eps"},
        positive=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"),
        # transformers' BertConfig defaults
        defaults={"hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2, "tie_word_embeddings": True,
                  "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False},
        require={"hidden_act": Only("gelu", why="the spec's MLP uses erf GELU"),
                 "position_embedding_type": Only("absolute", why="the spec has learned absolute positions"),
                 "is_decoder": Only(False, why="the spec's attention is bidirectional"),
                 "add_cross_attention": Only(False, why="the spec has no cross-attention")},
        ignore=("dropout_rate", "n_labels"),  # training choices, and the classifier head the MLM map does not load
    ),
)
