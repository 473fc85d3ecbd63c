"""Weight maps users write, and the errors bad maps and bad checkpoints get.

A map for a family archc has no built-in map for (transformers' StableLM, with a spec of its own) is
written to a file and used from the CLI and the API, both ways, without touching archc; a map for
Meta's original Llama layout exercises the rotary permutation. Every bad map, config or tensor
file is a clear error naming the file and key (exit 1, never 3).
"""

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from hf_checkpoints import (
    ATOL,
    ROOT,
    VOCAB,
    assert_same_decoding,
    assert_same_logits,
    config,
    corrupt,
    randomise,
    spec_path,
    tokens,
)
from safetensors.torch import load_file, load_model, save_file

import archc
from archc.cli import main
from archc.dsl.diagnostics import SpecError
from archc.interop.hf import (
    convert_state_dict,
    expected_weights,
    load_hf,
    load_hf_into,
    save_hf,
)
from archc.interop.maps import (
    Add,
    Config,
    MapError,
    PermuteRotary,
    Rename,
    Scale,
    Split,
    Stack,
    WeightMap,
    load_map_file,
)
from archc.interop.weights import WeightsError

transformers = pytest.importorskip("transformers")

# ---- a family archc has no map for: StableLM (LayerNorms with biases, q/k/v biases) ------------------

STABLELM_SPEC = """
# StableLM-2 style: Llama's decoder with LayerNorms (with bias) and biased q, k, v projections.
param vocab: int = 256
param d_model: int = 128
param n_layers: int = 2
param n_heads: int = 4
param n_kv_heads: int = 4
param d_ff: int = 256
param rope_theta: float = 10000.0
param eps: float = 1e-5

block Layer(x: Tensor[B, T, d_model]) {
    x += attention(layer_norm(x, eps) as attn_norm, heads=n_heads, kv_heads=n_kv_heads, rope=true,
                   rope_theta=rope_theta, bias=true, out_bias=false) as attn
    x += swiglu(layer_norm(x, eps) as mlp_norm, hidden=d_ff) as mlp
    return x
}

model StableLM(tokens: Tokens[B, T]) {
    x = embedding(tokens, vocab, d_model) as embed
    repeat i in 0..n_layers as layers { x = Layer(x) }
    logits = linear(layer_norm(x, eps) as norm, vocab, bias=false) as head
    loss = next_token_loss(logits, tokens)
    return logits, loss
}
"""

# The map README.md shows ("Bring your own checkpoint"), run as a user would: from its own file.
STABLELM_MAP = re.search(r"```python\n(# stablelm_map\.py.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)


@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    root = tmp_path_factory.mktemp("stablelm")
    (root / "stablelm.arch").write_text(STABLELM_SPEC)
    (root / "stablelm_map.py").write_text(STABLELM_MAP)
    cfg = transformers.StableLmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_qkv_bias=True, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 31337.0, "partial_rotary_factor": 1.0},
        attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(11)
    hf = transformers.StableLmForCausalLM(cfg).eval()
    randomise(hf)
    hf.save_pretrained(root / "hf")
    return root, hf


def test_user_map_from_the_api(stablelm):
    root, hf = stablelm
    compiled, model = load_hf(str(root / "stablelm.arch"), root / "hf", map=str(root / "stablelm_map.py"))
    assert compiled.params["n_kv_heads"] == 2 and compiled.params["rope_theta"] == 31337.0
    assert_same_logits(model, hf)
    assert_same_decoding(model, hf)


def test_user_map_from_the_cli_both_ways(stablelm, tmp_path, capsys):
    root, hf = stablelm
    spec, map_file, out = str(root / "stablelm.arch"), str(root / "stablelm_map.py"), tmp_path / "slm.safetensors"
    assert main(["convert", spec, "--from-hf", str(root / "hf"), "--map", map_file, "-o", str(out)]) == 0
    assert f"stablelm ({map_file} map)" in capsys.readouterr().err
    # the converted file remembers its family but not the map file: export names the map again
    assert main(["export", spec, str(tmp_path / "hf"), "--checkpoint", str(out), "--map", map_file,
                 "--config-from", str(root / "hf")]) == 0
    original, exported = load_file(root / "hf" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(again).__name__ == "StableLmForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(again(tokens()).logits, hf(tokens()).logits, atol=0, rtol=0)


def test_user_map_refusals_name_the_field(stablelm, tmp_path):
    root, _hf = stablelm
    broken = corrupt(root / "hf", tmp_path / "parallel", config_edit=lambda c: c.update(use_parallel_residual=True))
    with pytest.raises(SpecError, match="use_parallel_residual=True .*the spec's residuals are sequential"):
        load_hf(str(root / "stablelm.arch"), broken, map=str(root / "stablelm_map.py"))
    partial = corrupt(root / "hf", tmp_path / "partial", config_edit=lambda c: c["rope_parameters"].pop(
        "partial_rotary_factor"))  # StableLM's default is 0.25: a quarter of each head rotates
    with pytest.raises(SpecError, match="partial_rotary_factor=0.25"):
        load_hf(str(root / "stablelm.arch"), partial, map=str(root / "stablelm_map.py"))


# ---- Meta's original Llama layout: renamed keys, q and k rows in interleaved rotary order -------------

META_MAP = WeightMap(
    model_type="meta_llama", architecture="LlamaForCausalLM",
    keys={"tok_embeddings.weight": "embed.weight", "norm.weight": "norm.weight", "output.weight": "head.weight",
          "layers.{}.attention_norm.weight": "layers.{}.attn_norm.weight",
          "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
          "layers.{}.attention.wq.weight": Rename("layers.{}.attn.q.weight", PermuteRotary("n_heads")),
          "layers.{}.attention.wk.weight": Rename("layers.{}.attn.k.weight", PermuteRotary("n_kv_heads")),
          "layers.{}.attention.wv.weight": "layers.{}.attn.v.weight",
          "layers.{}.attention.wo.weight": "layers.{}.attn.o.weight",
          "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.gate.weight",
          "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.up.weight",
          "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.down.weight"},
    config=Config(params={"vocab_size": "vocab", "dim": "d_model", "ffn_dim": "d_ff", "n_layers": "n_layers",
                          "n_heads": "n_heads", "n_kv_heads": "n_kv_heads", "norm_eps": "eps"}, rope="rope_theta"),
)


def _interleave(w, heads):
    """Meta's layout of a q/k weight from HF's: row i of a head's first half goes to 2i, of its second to 2i + 1."""
    size = w.shape[0] // heads
    order = torch.empty(size, dtype=torch.long)
    order[0::2], order[1::2] = torch.arange(size // 2), torch.arange(size // 2, size)
    return torch.cat([w[h * size:(h + 1) * size][order] for h in range(heads)])


def test_meta_layout_with_rotary_permutation(hf_checkpoints, tmp_path):
    directory, hf = hf_checkpoints("llama")
    cfg = config(directory)
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    hf_to_meta = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
                  "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
                  "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    meta = {}
    for key, t in load_file(directory / "model.safetensors").items():
        name = names.get(key)
        if name is None:
            layer, rest = re.match(r"model\.layers\.(\d+)\.(.*)\.weight", key).groups()
            name = f"layers.{layer}.{hf_to_meta[rest]}.weight"
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}.get(key.split(".")[-2])
        meta[name] = _interleave(t, heads) if heads else t
    (tmp_path / "meta").mkdir()
    save_file(meta, tmp_path / "meta" / "model.safetensors")
    (tmp_path / "meta" / "config.json").write_text(json.dumps(
        {"dim": 64, "ffn_dim": 96, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "norm_eps": 1e-5,
         "rope_theta": 31337.0}))  # no model_type: the map is passed

    _compiled, model = load_hf(spec_path("llama"), tmp_path / "meta", map=META_MAP)
    assert_same_logits(model, hf)
    without = load_hf(spec_path("llama"), tmp_path / "meta",
                      map=WeightMap(model_type="meta_llama", architecture="x", config=META_MAP.config,
                                    keys={k: (v.target if isinstance(v, Rename) else v) for k, v in META_MAP.keys.items()}))[1]
    with torch.no_grad():  # the permutation matters
        assert (without(tokens())["logits"] - hf(tokens()).logits).abs().max() > 1e-3  # 10x the tolerance

    compiled, model = load_hf(spec_path("llama"), tmp_path / "meta", map=META_MAP)
    save_hf(compiled, model, tmp_path / "back", META_MAP)  # the permutation undone exactly
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == meta.keys() and all(torch.equal(back[k], meta[k]) for k in meta)


# ---- value transforms and map validation ---------------------------------------------------------------


def test_transforms_invert():
    w = torch.randn(6 * 8, 5)  # 6 heads of 8 rows
    for transform in (PermuteRotary(6), PermuteRotary("h"), Scale(0.25)):
        back = transform.inverse(transform.forward(w, {"h": 6}), {"h": 6})
        assert torch.equal(back, w)
    # interleaved pairs (rows 0, 1), (2, 3), ... of each head become its halves: even rows, then odd rows
    assert torch.equal(PermuteRotary(6).forward(w, {}), _deinterleave(w, 6))
    assert torch.equal(_interleave(_deinterleave(w, 6), 6), w)
    assert torch.equal(PermuteRotary(6).forward(w[:, 0], {}), _deinterleave(w, 6)[:, 0])  # biases too
    x = torch.rand(100) - 0.5  # Add is exact through archc's value: (1 + w) - 1 + 1 == 1 + w
    once = Add(1.0).forward(x, {})
    assert torch.equal(Add(1.0).forward(Add(1.0).inverse(once, {}), {}), once)
    bf16 = torch.randn(4, dtype=torch.bfloat16)  # computed in fp32, as transformers' `1.0 + weight.float()`
    assert Add(1.0).forward(bf16, {}).dtype == torch.float32
    with pytest.raises(WeightsError, match="do not make 4 heads"):
        PermuteRotary(4).forward(torch.zeros(6, 2), {})


def test_split_by_groups_cuts_each_head_and_joins_it_back():
    """GPT-NeoX's q|k|v: rows [heads, 3, head_dim] (each head's q, k, v rows in turn), cut by groups=heads;
    and unequal parts per group (2 query rows and 1 key row per group)."""
    from archc.interop.remap import to_archc, to_hf

    fused = torch.randn(4 * 3 * 5, 7)  # 4 heads of 5 dims
    wmap = WeightMap(model_type="m", architecture="M", config=Config(params={}),
                     keys={"l.{}.qkv.weight": Split(["l.{}.q.weight", "l.{}.k.weight", "l.{}.v.weight"], groups="h")})
    expect = {f"l.0.{t}.weight": (20, 7) for t in "qkv"}
    parts, _sources = to_archc(wmap, {"l.0.qkv.weight": fused}, expect, {"h": 4})
    per_head = fused.view(4, 3, 5, 7)
    for i, t in enumerate("qkv"):
        assert torch.equal(parts[f"l.0.{t}.weight"], per_head[:, i].reshape(20, 7))
    assert torch.equal(to_hf(wmap, parts, {"h": 4})["l.0.qkv.weight"], fused)
    uneven = {"l.0.q.weight": (8, 7), "l.0.k.weight": (4, 7), "l.0.v.weight": (4, 7)}
    parts, _ = to_archc(wmap, {"l.0.qkv.weight": fused[:16]}, uneven, {"h": 4})
    assert torch.equal(parts["l.0.q.weight"], fused[:16].view(4, 4, 7)[:, :2].reshape(8, 7))
    with pytest.raises(WeightsError, match=r"does not split along dim 0 in 3 groups"):
        to_archc(wmap, {"l.0.qkv.weight": fused[:16]}, uneven, {"h": 3})
    with pytest.raises(WeightsError, match="no positive int parameter h"):
        to_archc(wmap, {"l.0.qkv.weight": fused}, expect, {})


def test_a_key_pattern_may_spell_its_index_out():
    """BLT's encoder keeps one cross-attention as `cross.0`, the spec has it once, unindexed; `cross.{}` of the
    decoder stays indexed. Both ways, and a key of another index is unexpected."""
    from archc.interop.remap import to_archc, to_hf

    wmap = WeightMap(model_type="m", architecture="M", config=Config(params={}),
                     keys={"enc.cross.0.w": "enc_cross.w", "dec.cross.{}.w": "dec.{}.cross.w"})
    state = {"enc.cross.0.w": torch.randn(2), "dec.cross.0.w": torch.randn(2), "dec.cross.1.w": torch.randn(2)}
    expect = {"enc_cross.w": (2,), "dec.0.cross.w": (2,), "dec.1.cross.w": (2,)}
    parts, _sources = to_archc(wmap, state, expect)
    assert torch.equal(parts["enc_cross.w"], state["enc.cross.0.w"])
    assert torch.equal(parts["dec.1.cross.w"], state["dec.cross.1.w"])
    back = to_hf(wmap, parts)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(WeightsError, match=r"unexpected \(1\): enc.cross.1.w"):
        to_archc(wmap, {**state, "enc.cross.1.w": torch.randn(2)}, expect)


def _deinterleave(w, heads):
    size = w.shape[0] // heads
    order = torch.cat([torch.arange(0, size, 2), torch.arange(1, size, 2)])
    return torch.cat([w[h * size:(h + 1) * size][order] for h in range(heads)])


@pytest.mark.parametrize("build, message", [
    (lambda: Split(["a.{}.q", "a.{}.k"], dim=-1), "dim must be a non-negative int"),
    (lambda: Rename("x", "not a transform"), "is not a value transform"),
    (lambda: Add("1"), "must be a number"),
    (lambda: PermuteRotary(0), "positive int or a spec parameter"),
    (lambda: Split(["a.q", "a.k"], groups=-2), "Split groups must be a positive int or a spec parameter"),
    (lambda: WeightMap(model_type="m", architecture="M", config=Config(params={}), keys={"a.{}.w": "b.w"}),
     r"key 'a.\{\}.w': target 'b.w' has 0 '\{\}', the key 1"),
    (lambda: WeightMap(model_type="m", architecture="M", config=Config(params={}),
                       keys={"a.{}.w": Stack(["b.{}.w"])}), "Stack's targets hold one more"),
    (lambda: WeightMap(model_type="m", architecture="M", config=Config(params={}), keys={"a": 3}), "is not a rule"),
    (lambda: Config(params={"hidden_size": "d model"}), "must map config fields to spec parameter names"),
    (lambda: Config(params={}, require={"x": False}), r"must be Only\(value"),
])
def test_bad_maps_are_refused(build, message):
    with pytest.raises(MapError, match=message):
        build()


def test_map_files_errors_name_file_and_line(tmp_path, hf_checkpoints, capsys):
    directory, _hf = hf_checkpoints("llama")
    cases = {
        "syntax.py": ("MAP = WeightMap(\n", r"syntax.py:1:\d+: '\(' was never closed"),
        "raises.py": (("from archc.interop.maps import *\n\nMAP = WeightMap(model_type='m', architecture='M', "
                      "config=Config(params={}), keys={'a.{}': 'b'})\n"), r"raises.py:3: key 'a.\{\}'"),
        "empty.py": ("X = 1\n", "defines nothing as MAP"),
        "missing.py": (None, "no such map file"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(MapError, match=message):
            load_map_file(tmp_path / name)
        out = tmp_path / "out.safetensors"
        assert main(["convert", spec_path("llama"), "--from-hf", str(directory), "--map", str(tmp_path / name),
                     "-o", str(out)]) == 1
        assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_a_failing_map_hook_is_reported_at_its_line(hf_checkpoints, tmp_path, capsys):
    directory, _hf = hf_checkpoints("llama")
    (tmp_path / "hook.py").write_text(textwrap.dedent("""\
        import attrs
        from archc.interop.families.llama import LLAMA

        def prepare(c):
            return {"d_ff": c["ffn_hidden"]}  # no such field

        MAP = attrs.evolve(LLAMA, config=attrs.evolve(LLAMA.config, prepare=prepare))
        """))
    assert main(["convert", spec_path("llama"), "--from-hf", str(directory), "--map", str(tmp_path / "hook.py"),
                 "-o", str(tmp_path / "out.safetensors")]) == 1
    assert f"{tmp_path / 'hook.py'}:5: Config.prepare: KeyError: 'ffn_hidden'" in capsys.readouterr().err


# ---- bad checkpoints: every one a clear error (exit 1), never a cast, never exit 3 ----------------------


def _truncate(directory, dst):
    corrupt(directory, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def _garbage(directory, dst):
    corrupt(directory, dst)
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return dst


def _tensor(key, value):
    return lambda directory, dst: corrupt(directory, dst, edit=lambda s: s.update({key: value(s[key])}))


def _cfg(**changes):
    return lambda directory, dst: corrupt(directory, dst, config_edit=lambda c: c.update(changes))


def _raw_config(text):
    def make(directory, dst):
        corrupt(directory, dst)
        (dst / "config.json").write_text(text)
        return dst
    return make


Q = "model.layers.1.self_attn.q_proj.weight"
BAD = {
    "truncated": (_truncate, WeightsError, r"model\.safetensors: cannot read safetensors"),
    "not safetensors": (_garbage, WeightsError, r"model\.safetensors: cannot read safetensors"),
    "int8 tensor": (_tensor(Q, lambda t: t.to(torch.int8)), WeightsError, re.escape(Q) + r" \(int8\).*never casts"),
    "float8 tensor": (_tensor(Q, lambda t: t.to(torch.float8_e4m3fn)), WeightsError, r"float8_e4m3fn"),
    "quantization_config": (_cfg(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
                            SpecError, r"config\.json quantization_config='bitsandbytes'.*refused, never cast"),
    "string width": (_cfg(hidden_size="64"), SpecError, r"config\.json hidden_size='64': expected an integer"),
    "string eps": (_cfg(rms_norm_eps="1e-5"), SpecError, r"rms_norm_eps='1e-5': expected a number"),
    "string tie": (_cfg(tie_word_embeddings="false"), SpecError, r"tie_word_embeddings='false': expected true or false"),
    "zero heads": (_cfg(num_attention_heads=0), SpecError, r"num_attention_heads=0: expected a positive integer"),
    "null heads": (_cfg(num_attention_heads=None), SpecError, r"lacks num_attention_heads"),
    "bool layers": (_cfg(num_hidden_layers=True), SpecError, r"num_hidden_layers=True: expected"),
    "rope not an object": (_cfg(rope_parameters="yarn"), SpecError, r"rope_parameters='yarn': expected a JSON object"),
    "unknown rope_type": (_cfg(rope_parameters={"rope_type": "longrope", "rope_theta": 5e5}), SpecError,
                          r"rope_type='longrope' cannot be represented by the spec: the spec's RoPE scalings are "
                          r"llama3, yarn"),
    "llama3 lacks a field": (_cfg(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
                             SpecError, r"rope_parameters lacks low_freq_factor, which rope_type 'llama3' needs"),
    "yarn field the spec lacks": (_cfg(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16,
                                                        "original_max_position_embeddings": 32}), SpecError,
                                  r"beta_fast=16.0 cannot be represented by the spec: the spec declares no "
                                  r"rope_beta_fast parameter, and its yarn RoPE uses 32.0"),
    "bad rope factor": (_cfg(rope_parameters={"rope_type": "yarn", "factor": "4", "rope_theta": 5e5,
                                              "original_max_position_embeddings": 32}), SpecError,
                        r"rope_parameters factor='4': expected a positive number"),
    "partial rotary": (_cfg(rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}),
                       SpecError, r"partial_rotary_factor=0.5 cannot be represented by the spec: the spec's RoPE "
                                  r"rotates the whole head"),
    "config a list": (_raw_config("[1, 2]"), WeightsError, r"config\.json: expected a JSON object"),
    "config not JSON": (_raw_config("{model_type: llama"), WeightsError, r"config\.json: not valid JSON"),
    "unknown model_type": (_cfg(model_type="falcon"), SpecError, r"'falcon' has no built-in weight map"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_checkpoints_are_clear_errors(hf_checkpoints, tmp_path, capsys, problem):
    make, error, message = BAD[problem]
    directory = make(hf_checkpoints("llama")[0], tmp_path / "bad")
    with pytest.raises(error, match=message):
        load_hf(spec_path("llama"), directory)
    out = tmp_path / "out.safetensors"
    assert main(["convert", spec_path("llama"), "--from-hf", str(directory), "-o", str(out)]) == 1
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_scaled_rope_needs_a_map_and_spec_that_take_it(hf_checkpoints):
    directory, _hf = hf_checkpoints("llama3_rope")
    # the qwen2 spec has Llama's parameters but no rope_scaling; the mixtral map takes no scaled RoPE at all
    with pytest.raises(SpecError, match="the spec declares no rope_scaling parameter"):
        load_hf(str(ROOT / "specs" / "qwen2.arch"), directory, map="llama")
    with pytest.raises(SpecError, match="rope_type='llama3' cannot be represented by the spec: the spec's RoPE is "
                                        "unscaled"):
        load_hf(spec_path("mixtral"), directory, map="mixtral")
    compiled, _model = load_hf(spec_path("llama3_rope"), directory)
    assert {k: compiled.params[k] for k in ("rope_scaling", "rope_factor", "rope_original_max",
                                             "rope_low_freq_factor", "rope_high_freq_factor")} == {
        "rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max": 32, "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0}
    assert "scaling=AF.Llama3RopeScaling(factor=8.0, original_max=32" in compiled.source


# ---- tied heads decided by the spec's weights, not by a spec parameter ---------------------------------

UNTIED_LLAMA = Path(spec_path("llama")).read_text().replace("param tie_embeddings: bool = false\n", "") \
    .replace("    if tie_embeddings {\n        logits = linear(x, vocab, bias=false, tie=embed) as head\n    } else {\n", "") \
    .replace("        logits = linear(x, vocab, bias=false) as head\n    }\n", "    logits = linear(x, vocab, bias=false) as head\n")
TIED_LLAMA = UNTIED_LLAMA.replace("linear(x, vocab, bias=false) as head", "linear(x, vocab, bias=false, tie=embed) as head")


def test_llama_map_without_a_tie_parameter(hf_checkpoints, tmp_path):
    assert "tie_embeddings" not in UNTIED_LLAMA and "tie=embed" in TIED_LLAMA
    directory, hf = hf_checkpoints("llama")
    _compiled, model = load_hf(UNTIED_LLAMA, directory)
    assert_same_logits(model, hf)
    torch.manual_seed(12)
    tied_hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config(directory), "tie_word_embeddings": True}))
    randomise(tied_hf.eval())
    tied_hf.save_pretrained(tmp_path / "tied")
    _compiled, model = load_hf(TIED_LLAMA, tmp_path / "tied")
    assert_same_logits(model, tied_hf)
    with pytest.raises(SpecError, match="tie_word_embeddings=true: .* its own \\(head.weight\\)"):
        load_hf(UNTIED_LLAMA, tmp_path / "tied")
    with pytest.raises(WeightsError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_hf(TIED_LLAMA, directory)  # an untied checkpoint into a spec that ties


# ---- the API for weights into a model built elsewhere (training from a checkpoint) --------------------


def test_load_hf_into_a_built_model(hf_checkpoints):
    directory, hf = hf_checkpoints("qwen3")
    params = {"vocab": VOCAB, "d_model": 64, "d_ff": 96, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 24,
                  "rope_theta": 31337.0, "eps": 1e-6}
    compiled = archc.compile(spec_path("qwen3"), params)
    model = compiled.build().eval()
    load_hf_into(compiled, model, directory)
    assert_same_logits(model, hf)
    other = archc.compile(spec_path("qwen3"), {**params, "d_ff": 128})
    with pytest.raises(WeightsError, match="d_ff: config.json gives 96, the model has 128"):
        load_hf_into(other, other.build(), directory)


def test_convert_state_dict_sizes_parts_from_the_model(hf_checkpoints):
    """Phi-3's fused q|k|v (4 query heads, 2 kv heads) is cut by the model's shapes: 64 | 32 | 32 rows."""
    directory, _hf = hf_checkpoints("phi3")
    compiled, model = load_hf(spec_path("phi3"), directory)
    state = load_file(directory / "model.safetensors")
    converted = convert_state_dict("phi3", state, expect=expected_weights(compiled, model), params=compiled.params)
    qkv = state["model.layers.0.self_attn.qkv_proj.weight"]
    assert [converted[f"layers.0.attn.{p}.weight"].shape[0] for p in "qkv"] == [64, 32, 32]
    assert torch.equal(converted["layers.0.attn.k.weight"], qkv[64:96])
    with pytest.raises(WeightsError, match="does not split into 3 equal parts"):  # without the model: equal parts
        convert_state_dict("phi3", {"model.layers.0.self_attn.qkv_proj.weight": qkv[:127]}, n_layers=2)


# ---- export: trained runs and refusals ------------------------------------------------------------------


def test_export_a_training_run(tmp_path, capsys):
    from archc.training.checkpoint import save_checkpoint

    params = {"vocab": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48}
    compiled = archc.compile(spec_path("llama"), params)
    torch.manual_seed(13)
    model = compiled.build()
    save_checkpoint(tmp_path / "run", 1, model, meta={"spec_sha": compiled.ir.meta["sha256"],
                                                      "params": compiled.params})
    out = tmp_path / "hf"
    assert main(["export", spec_path("llama"), str(out), "--checkpoint", str(tmp_path / "run")]) == 1
    assert "pass --arch or --map" in capsys.readouterr().err  # a run does not know its family
    assert main(["export", spec_path("llama"), str(out), "--checkpoint", str(tmp_path / "run"), "--arch", "llama"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens())["logits"], hf(tokens()).logits, atol=ATOL, rtol=0)


def test_convert_then_export_is_the_identity(hf_checkpoints, tmp_path):
    directory, _hf = hf_checkpoints("mixtral")
    converted = tmp_path / "mixtral.safetensors"
    assert main(["convert", spec_path("mixtral"), "--from-hf", str(directory), "-o", str(converted)]) == 0
    model = archc.compile(spec_path("mixtral"), json.loads(load_file_metadata(converted)["archc.params"])).build()
    load_model(model, converted)  # strict: an archc weights file
    assert main(["export", spec_path("mixtral"), str(tmp_path / "hf"), "--checkpoint", str(converted)]) == 0
    original, exported = load_file(directory / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("family, spec, overrides, message", [
    ("mistral", "sliding_window.arch", {}, r"cannot say global_every=4 \(it would load back as 5\)"),
    ("mistral", "sliding_window.arch", {"global_every": 9, "sinks": 2}, r"sinks=2 \(it would load back as 0\)"),
    ("llama", "gpt2.arch", {}, "spec parameters d_ff, n_kv_heads, rope_theta, which this spec does not declare"),
])
def test_export_refuses_what_the_family_cannot_say(tmp_path, capsys, family, spec, overrides, message):
    compiled = archc.compile(str(Path(spec_path("llama")).parent / spec), {"n_layers": 4, **overrides})
    with pytest.raises(SpecError, match=message):
        save_hf(compiled, compiled.build(), tmp_path / "out", family)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_numbers_written_in_a_pattern_match_only_themselves():
    from archc.interop.maps import Config
    from archc.interop.remap import to_archc, to_hf

    wmap = WeightMap(model_type="toy", architecture="Toy", config=Config(params={}), keys={
        "enc.block.0.layer.0.table": "table",  # only block 0 stores it
        "enc.block.{}.layer.0.q": "enc.{}.q",
        "enc.block.{}.layer.1.wi": "enc.{}.wi",
        "enc.block.{}.layer.{}.other": "enc.{}.other.{}",  # fewest literal numbers win
    })
    state = {"enc.block.0.layer.0.table": torch.ones(2), "enc.block.1.layer.0.q": torch.zeros(1),
             "enc.block.2.layer.1.wi": torch.full((1,), 2.0), "enc.block.0.layer.1.other": torch.full((1,), 3.0)}
    out, _ = to_archc(wmap, state)
    assert sorted(out) == ["enc.0.other.1", "enc.1.q", "enc.2.wi", "table"]
    with pytest.raises(WeightsError, match="enc.block.1.layer.0.table"):
        to_archc(wmap, {"enc.block.1.layer.0.table": torch.ones(2)})  # block 1 has no table
    assert to_hf(wmap, out).keys() == state.keys()
