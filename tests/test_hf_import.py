"""Hugging Face checkpoints load into archc models and compute the same logits.

HF models are built from small random configs (no download) and saved with
`save_pretrained` (safetensors); archc loads them from disk via
`archc.interop.hf` and must match HF's logits in fp32.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model, save_file

import archc
from archc.cli import main
from archc.dsl.diagnostics import SpecError
from archc.interop.hf import convert_state_dict, hf_overrides, load_hf
from archc.interop.weights import WeightsError

transformers = pytest.importorskip("transformers")

SPECS = Path(__file__).resolve().parents[1] / "specs"
GPT2_SPEC, LLAMA_SPEC = str(SPECS / "gpt2.arch"), str(SPECS / "llama.arch")
ATOL = 1e-4


def _tokens(vocab, B=2, T=19, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomise_vectors(model):
    """HF inits norms to 1 and biases to 0; random values make a mis-mapped vector visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name or ".ln_" in name else p.normal_(0.0, 0.1)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    cfg = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0,  # ids inside the small vocab
    )
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _randomise_vectors(hf)
    directory = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(directory)  # safetensors; the tied lm_head.weight is not stored
    return directory, hf


def _hf_llama(directory, tie, max_shard_size="5GB"):
    cfg = transformers.LlamaConfig(
        vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 31337.0},
        tie_word_embeddings=tie, attention_dropout=0.0, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _randomise_vectors(hf)
    hf.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory, hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _hf_llama(tmp_path_factory.mktemp("llama"), tie=False)


def _assert_same_logits(model, hf, vocab):
    tokens = _tokens(vocab)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens, labels=tokens)
    torch.testing.assert_close(ours["logits"], theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["loss"], theirs.loss, atol=ATOL, rtol=0)


def test_gpt2_matches_hf(gpt2):
    directory, hf = gpt2
    compiled, model = load_hf(GPT2_SPEC, directory)
    assert {k: compiled.params[k] for k in ("vocab", "max_len", "d_model", "n_layers", "n_heads")} == \
        dict(vocab=96, max_len=32, d_model=48, n_layers=2, n_heads=4)
    _assert_same_logits(model, hf, 96)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_matches_hf(tmp_path, tie):
    directory, hf = _hf_llama(tmp_path, tie)
    compiled, model = load_hf(LLAMA_SPEC, directory)
    assert compiled.params["tie_embeddings"] is tie
    assert compiled.params["rope_theta"] == 31337.0 and compiled.params["n_kv_heads"] == 2
    _assert_same_logits(model, hf, 80)


def test_mistral_sliding_window_matches_hf(tmp_path):
    """Every layer windowed (window 5 < T = 19), grouped-query attention: HF's eager sliding-window mask."""
    cfg = transformers.MistralConfig(
        vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, sliding_window=5, attention_dropout=0.0,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(3)
    hf = transformers.MistralForCausalLM(cfg).eval()
    _randomise_vectors(hf)
    hf.save_pretrained(tmp_path)
    compiled, model = load_hf(str(SPECS / "sliding_window.arch"), tmp_path)
    assert compiled.params["window"] == 5 and compiled.params["global_every"] == 3
    _assert_same_logits(model, hf, 80)
    # the window matters at this length: the same weights without it give other logits
    with torch.no_grad():
        unwindowed = load_hf(LLAMA_SPEC, tmp_path, map="llama")[1](_tokens(80))["logits"]
    assert (unwindowed - model(_tokens(80))["logits"]).abs().max() > 1e-2


def test_sharded_checkpoint(tmp_path):
    directory, hf = _hf_llama(tmp_path, tie=False, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    _assert_same_logits(load_hf(LLAMA_SPEC, directory)[1], hf, 80)


def test_gpt2_base_model_checkpoint_with_legacy_buffers(gpt2):
    """The hub's `gpt2` was saved from GPT2Model: no `transformer.` prefix, plus old attn.bias buffers."""
    directory, _hf = gpt2
    state = load_file(directory / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    converted = convert_state_dict("gpt2", bare, n_layers=2)
    canonical = archc.compile(GPT2_SPEC, hf_overrides("gpt2", _config(directory))).canonical_names()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v) for k, v in canonical.items()}
    w = state["transformer.h.1.attn.c_attn.weight"]  # Conv1D [in, 3 * out]: k is the middle third, transposed
    torch.testing.assert_close(converted["h.1.attn.k.weight"], w[:, 48:96].t(), atol=0, rtol=0)


def test_convert_cli(llama, tmp_path, capsys):
    directory, hf = llama
    out = tmp_path / "llama.safetensors"
    assert main(["convert", LLAMA_SPEC, "--from-hf", str(directory), "-o", str(out)]) == 0
    assert "all weights matched" in capsys.readouterr().err
    model = archc.compile(LLAMA_SPEC, hf_overrides("llama", _config(directory))).build().eval()
    load_model(model, out)  # strict: every key of our model, and nothing else
    _assert_same_logits(model, hf, 80)


def _config(directory):
    return json.loads((Path(directory) / "config.json").read_text())


def _corrupt(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


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
    directory = _corrupt(gpt2[0], tmp_path / "broken", edit)
    with pytest.raises(WeightsError, match=re.escape(key)):
        load_hf(GPT2_SPEC, directory)


def test_cli_reports_bad_checkpoint(gpt2, tmp_path, capsys):
    key, edit = BROKEN["missing"]
    directory = _corrupt(gpt2[0], tmp_path / "broken", edit)
    out = tmp_path / "out.safetensors"
    assert main(["convert", GPT2_SPEC, "--from-hf", str(directory), "-o", str(out)]) == 1
    assert key in capsys.readouterr().err and not out.exists()


def test_tied_copy_must_match(gpt2, tmp_path):
    directory = _corrupt(gpt2[0], tmp_path / "untied",
                         lambda s: s.update({"lm_head.weight": torch.zeros_like(s["transformer.wte.weight"])}))
    with pytest.raises(WeightsError, match="lm_head.weight differs"):
        load_hf(GPT2_SPEC, directory)


LLAMA_CFG = dict(model_type="llama", vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, rms_norm_eps=1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},  # transformers 5
    {"rope_theta": 5e5, "rope_scaling": None},  # transformers 4
    {"rope_scaling": {"rope_type": "default", "rope_theta": 5e5}},
])
def test_llama_config_map(rope):
    overrides = hf_overrides("llama", {**LLAMA_CFG, **rope})
    assert overrides == dict(vocab=80, d_model=64, d_ff=96, n_layers=2, n_heads=4, n_kv_heads=4,
                             rope_theta=5e5, eps=1e-5, tie_embeddings=False)


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
    base = LLAMA_CFG if arch in ("llama", "mistral") else dict(model_type="gpt2", vocab_size=96, n_positions=32, n_embd=48,
                                                  n_layer=2, n_head=4)
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
