"""GPT-2, Llama and Mistral checkpoints: what config.json sets, sharded and bare-model layouts, the
convert command, and the strict report (parity of every family: test_hf_families.py).

HF models are built from small random configs (no download) and saved with
`save_pretrained` (safetensors); archc loads them from disk via
`archc.interop.hf` and must match HF's logits in fp32.
"""

import json
import re
import shutil

import pytest
import torch
from hf_checkpoints import (
    COMMON,
    ROPE,
    VOCAB,
    assert_same_logits,
    config,
    corrupt,
    randomise,
    spec_path,
    tokens,
)
from safetensors.torch import load_file, load_model

import archc
from archc.cli import main
from archc.dsl.diagnostics import SpecError
from archc.interop.hf import convert_state_dict, expected_weights, hf_overrides, load_hf
from archc.interop.weights import WeightsError

transformers = pytest.importorskip("transformers")

GPT2_SPEC, LLAMA_SPEC = spec_path("gpt2"), spec_path("llama")


@pytest.fixture
def gpt2(hf_checkpoints):
    return hf_checkpoints("gpt2")


@pytest.fixture
def llama(hf_checkpoints):
    return hf_checkpoints("llama")


def _hf_llama(directory, tie, max_shard_size="5GB"):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=ROPE,
                                   tie_word_embeddings=tie, **COMMON)
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    randomise(hf)
    hf.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory, hf


def test_gpt2_params_from_config(gpt2):
    directory, _hf = gpt2
    compiled, _model = load_hf(GPT2_SPEC, directory)
    assert {k: compiled.params[k] for k in ("vocab", "max_len", "d_model", "n_layers", "n_heads")} == \
        {"vocab": VOCAB, "max_len": 32, "d_model": 48, "n_layers": 2, "n_heads": 4}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_matches_hf(tmp_path, tie):
    directory, hf = _hf_llama(tmp_path, tie)
    compiled, model = load_hf(LLAMA_SPEC, directory)
    assert compiled.params["tie_embeddings"] is tie
    assert compiled.params["rope_theta"] == 31337.0 and compiled.params["n_kv_heads"] == 2
    assert_same_logits(model, hf)


def test_mistral_sliding_window(hf_checkpoints):
    """Every layer windowed (window 5 < T = 19), grouped-query attention: HF's eager sliding-window mask."""
    directory, hf = hf_checkpoints("mistral")
    compiled, model = load_hf(spec_path("mistral"), directory)
    assert compiled.params["window"] == 5 and compiled.params["global_every"] == 3
    assert_same_logits(model, hf)
    # the window matters at this length: the same weights without it give other logits
    with torch.no_grad():
        unwindowed = load_hf(LLAMA_SPEC, directory, map="llama")[1](tokens())["logits"]
    assert (unwindowed - model(tokens())["logits"]).abs().max() > 1e-2


def test_sharded_checkpoint(tmp_path):
    directory, hf = _hf_llama(tmp_path, tie=False, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert_same_logits(load_hf(LLAMA_SPEC, directory)[1], hf)


def test_gpt2_base_model_checkpoint_with_legacy_buffers(gpt2):
    """The hub's `gpt2` was saved from GPT2Model: no `transformer.` prefix, plus old attn.bias buffers."""
    directory, _hf = gpt2
    state = load_file(directory / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    compiled = archc.compile(GPT2_SPEC, hf_overrides("gpt2", config(directory)))
    converted = convert_state_dict("gpt2", bare, expect=expected_weights(compiled))
    canonical = compiled.canonical_names()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v) for k, v in canonical.items()}
    w = state["transformer.h.1.attn.c_attn.weight"]  # Conv1D [in, 3 * out]: k is the middle third, transposed
    torch.testing.assert_close(converted["h.1.attn.k.weight"], w[:, 48:96].t(), atol=0, rtol=0)


def test_convert_cli(llama, tmp_path, capsys):
    directory, hf = llama
    out = tmp_path / "llama.safetensors"
    assert main(["convert", LLAMA_SPEC, "--from-hf", str(directory), "-o", str(out)]) == 0
    assert "all weights matched" in capsys.readouterr().err
    model = archc.compile(LLAMA_SPEC, hf_overrides("llama", config(directory))).build().eval()
    load_model(model, out)  # strict: every key of our model, and nothing else
    assert_same_logits(model, hf)


BROKEN = {
    "missing": ("transformer.h.1.mlp.c_fc.bias", lambda s: s.pop("transformer.h.1.mlp.c_fc.bias")),
    "extra": ("transformer.h.0.attn.lora_A.weight",
              lambda s: s.update({"transformer.h.0.attn.lora_A.weight": torch.zeros(4, 48)})),
    "out-of-range layer": ("transformer.h.2.ln_1.weight",
                           lambda s: s.update({"transformer.h.2.ln_1.weight": torch.ones(48)})),
    "shape": ("transformer.h.0.attn.c_proj.weight",
              lambda s: s.update({"transformer.h.0.attn.c_proj.weight": torch.zeros(48, 47)})),
    "unsplittable": ("transformer.h.1.attn.c_attn.bias",
                     lambda s: s.update({"transformer.h.1.attn.c_attn.bias": torch.zeros(145)})),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_strict_errors_name_the_key(gpt2, tmp_path, problem):
    key, edit = BROKEN[problem]
    directory = corrupt(gpt2[0], tmp_path / "broken", edit)
    with pytest.raises(WeightsError, match=re.escape(key)):
        load_hf(GPT2_SPEC, directory)


def test_cli_reports_bad_checkpoint(gpt2, tmp_path, capsys):
    key, edit = BROKEN["missing"]
    directory = corrupt(gpt2[0], tmp_path / "broken", edit)
    out = tmp_path / "out.safetensors"
    assert main(["convert", GPT2_SPEC, "--from-hf", str(directory), "-o", str(out)]) == 1
    assert key in capsys.readouterr().err and not out.exists()


def test_tied_copy_must_match(gpt2, tmp_path):
    directory = corrupt(gpt2[0], tmp_path / "untied",
                         lambda s: s.update({"lm_head.weight": torch.zeros_like(s["transformer.wte.weight"])}))
    with pytest.raises(WeightsError, match="lm_head.weight differs"):
        load_hf(GPT2_SPEC, directory)


LLAMA_CFG = {"model_type": "llama", "vocab_size": 80, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5}


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},  # transformers 5
    {"rope_theta": 5e5, "rope_scaling": None},  # transformers 4
    {"rope_scaling": {"rope_type": "default", "rope_theta": 5e5}},
])
def test_llama_config_map(rope):
    overrides = hf_overrides("llama", {**LLAMA_CFG, **rope})
    assert overrides == {"vocab": 80, "d_model": 64, "d_ff": 96, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                         "rope_theta": 5e5, "eps": 1e-5, "tie_embeddings": False}


@pytest.mark.parametrize("arch, change, field", [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type"),
    ("llama", {"rope_parameters": {"type": "linear", "factor": 2.0}}, "rope_type"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"head_dim": 32}, "head_dim"),
    ("llama", {"hidden_size": None}, "hidden_size"),
    ("mistral", {"sliding_window": None}, "sliding_window"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings"),
])
def test_unrepresentable_configs_are_rejected(arch, change, field):
    base = LLAMA_CFG if arch in ("llama", "mistral") else {"model_type": "gpt2", "vocab_size": 96, "n_positions": 32,
                                                           "n_embd": 48, "n_layer": 2, "n_head": 4}
    with pytest.raises(SpecError, match=field):
        hf_overrides(arch, {**base, **change})


def test_unsupported_model_type_and_missing_files(gpt2, tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        load_hf(GPT2_SPEC, directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(SpecError, match="falcon"):
        load_hf(LLAMA_SPEC, directory)
    shutil.copy(gpt2[0] / "config.json", directory / "config.json")
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_hf(GPT2_SPEC, directory)
    with pytest.raises(WeightsError, match="not a directory"):
        load_hf(GPT2_SPEC, tmp_path / "nowhere")
