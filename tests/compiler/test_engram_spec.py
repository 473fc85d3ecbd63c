"""`engram(x, tokens, ...)` in the language: specs/engram.arch against the plain Llama plus hand-placed memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import archc
from archc.dsl.diagnostics import SpecError
from archc.runtime.engram import Engram, is_prime

SPECS = Path(__file__).resolve().parents[2] / "specs"
SMALL = {"d_model": 32, "n_layers": 4, "n_heads": 2, "n_kv_heads": 1, "d_ff": 48, "vocab": 64,
         "memory_heads": 2, "memory_slots": 61, "memory_dim": 16}
MEMORY_AT = (1, 3)  # the `if i in [1, 3]` of specs/engram.arch


def _model(**over):
    torch.manual_seed(0)
    return archc.compile(SPECS / "engram.arch", {**SMALL, **over}).build().double()


def _memories(model) -> list[tuple[int, Engram]]:
    return [(i, layer.memory) for i, layer in enumerate(model.layers) if hasattr(layer, "memory")]


def test_memory_sits_at_the_chosen_layers_with_distinct_prime_tables():
    model = _model()
    memories = _memories(model)
    assert [i for i, _m in memories] == list(MEMORY_AT)
    assert [(m.layer_id, m.orders, m.heads, m.dim) for _i, m in memories] == [(0, (2, 3), 2, 16), (1, (2, 3), 2, 16)]
    primes = [int(p) for _i, m in memories for p in m.sizes.flatten()]
    assert len(set(primes)) == len(primes) == 8 and all(is_prime(p) and p >= 61 for p in primes)


def test_the_model_is_the_plain_llama_with_memory_added_before_the_chosen_layers():
    """The lowering against a hand-written forward: Llama's layers, and x += memory(x, tokens) before layers 1, 3."""
    model = _model()
    with torch.no_grad():  # trained-looking memory: rows and value weights of a useful size
        for _i, memory in _memories(model):
            memory.table.weight.normal_()
            memory.value.weight.normal_(std=0.2)
    plain = archc.compile(SPECS / "llama.arch", {k: v for k, v in SMALL.items() if not k.startswith("memory")})
    plain = plain.build().double()
    missing, unexpected = plain.load_state_dict(
        {k.replace(".decoder_layer.", "."): v for k, v in model.state_dict().items() if ".memory." not in k})
    assert not missing and not unexpected
    memories = dict(_memories(model))
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        x = plain.embed(tokens)
        for i, layer in enumerate(plain.layers):
            if i in memories:
                x = x + memories[i](x, tokens)
            x = layer(x)
        want = plain.head(plain.norm(x))
        got = model(tokens=tokens)["logits"]
    assert (want - plain(tokens=tokens)["logits"]).abs().max() > 1e-3  # the memory changes the output
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_token_by_token_decoding_equals_the_whole_sequence():
    from archc.runtime.mixers import generate_recurrent

    model = _model().eval()
    with torch.no_grad():
        for _i, memory in _memories(model):
            memory.table.weight.normal_()
            memory.value.weight.normal_(std=0.2)
            memory.conv.weight.normal_(std=0.5)
    prompt = torch.randint(0, 64, (2, 5))
    tokens, logits = generate_recurrent(model, prompt, steps=8, temperature=1.0, seed=3)
    with torch.no_grad():
        full = model(tokens=tokens[:, :-1])["logits"]
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)


def test_summary_separates_memory_from_compute_and_counts_what_a_token_reads():
    compiled = archc.compile(SPECS / "engram.arch", SMALL)
    model = compiled.build()
    built = sum(p.numel() for p in model.parameters())
    tables = sum(m.table.weight.numel() for _i, m in _memories(model))
    assert compiled.num_params() == built
    assert set(compiled.param_roles()) == set(dict(model.named_parameters()))
    assert {k for k, role in compiled.param_roles().items() if role == "memory"} == \
        {f"layers.{i}.memory.table.weight" for i in MEMORY_AT}
    reads = len(MEMORY_AT) * 2 * 16  # layers × orders × dim
    assert compiled.active_params() == built - tables + reads
    text = compiled.summary()
    assert f"memory params       {tables:,} " in text and f"compute params {built - tables:,} " in text
    assert f"active params       {built - tables + reads:,} " in text and f"the {reads} table entries" in text


def test_inside_one_plain_lane_the_memory_is_the_same_model():
    """engram inside lanes reads the open site's branch input; with one plain lane that is the stream itself."""
    body = """
block Layer(x: Tensor[B, T, 16]) {
    x += swiglu(rms_norm(x), hidden=24) as mlp
    return x
}

model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, 16) as embed
    LANES_OPEN
    repeat i in 0..2 as layers {
        if i in [1] { x += engram(x, tokens, orders=[2], heads=2, slots=31, dim=8) as memory }
        x = Layer(x)
    }
    LANES_CLOSE
    logits = linear(x, 32, bias=false) as head
    return logits
}
"""
    outs = []
    tokens = torch.randint(0, 32, (2, 7))
    for opened, closed in (("", ""), ('x = lanes(x, n=1, rule="plain")', "x = merge_lanes(x)")):
        torch.manual_seed(0)
        model = archc.compile(body.replace("LANES_OPEN", opened).replace("LANES_CLOSE", closed)).build().double()
        with torch.no_grad():
            model.layers[1].memory.table.weight.normal_()
            outs.append(model(tokens=tokens)["logits"])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize(("call", "message"), [
    ("engram(x, tokens, orders=[2, 2])", "`orders` must be distinct n-gram lengths >= 1"),
    ("engram(x, tokens, orders=[])", "`orders` must be distinct"),
    ("engram(x, tokens, heads=3, dim=16)", "dim=16 must be a multiple of heads=3"),
    ("engram(x, tokens, slots=[31])", "one table size >= 2 per order (2 here)"),
    ("engram(x, tokens, pad=99)", "pad=99 is not a token id (vocab=32)"),
    ("engram(x, x, dim=16)", "its `tokens` must be `Tokens`"),
    ("engram(x, other, dim=16)", "vocabulary size is unknown"),
    ("engram(x, tokens, dim=16, ordrs=[2])", "`engram` has no argument `ordrs`"),
])
def test_bad_engram_calls_are_located_errors(call, message):
    spec = ("model M(tokens: Tokens[B, T], other: Tokens[B, T]) {\n    x = embedding(tokens, 32, 16)\n"
            f"    x += {call}\n    return x\n}}\n")
    with pytest.raises(SpecError) as info:
        archc.compile(spec, name="bad.arch")
    err = info.value.errors[0] if getattr(info.value, "errors", None) else info.value
    assert message in err.message and err.span.line == 3, err.message


def test_tokens_of_another_length_are_refused():
    spec = ("model M(tokens: Tokens[B, T], other: Tokens[B, S]) {\n    x = embedding(tokens, 32, 16)\n"
            "    x += engram(x, other, vocab=32, dim=16)\n    return x\n}\n")
    with pytest.raises(SpecError, match=r"tokens \[B, S\] must give one id per position"):
        archc.compile(spec, name="bad.arch")


def test_archc_train_runs_the_engram_spec(tmp_path, capsys):
    from archc.cli import main

    argv = ["train", str(SPECS / "engram.arch"), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--no-progress", "--sample-tokens", "4", "--out-dir", str(tmp_path / "run"),
            *[f"-D{k}={v}" for k, v in SMALL.items() if k != "vocab"]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "val perplexity" in out


def test_a_memory_layer_moves_the_rows_it_reads_not_its_tables():
    from archc.compiler import analysis

    compiled = archc.compile(SPECS / "engram.arch", SMALL)
    graph = compiled.ir
    (node, _other) = [n for n in graph.nodes() if n.op == "engram"]
    sizes = analysis.sizes_for(graph, 2, 8)
    tables = analysis.node_memory_params(graph, node)
    rest = sum(p.numel() for p in compiled.build().layers[1].memory.parameters()) - tables
    stream, ids, rows = 2 * 8 * SMALL["d_model"] * 4, 2 * 8 * 8, 2 * 8 * (2 * 16) * 4  # B=2, T=8; 2 orders × dim 16
    assert analysis.node_bytes(graph, node, sizes, 4) == stream + ids + stream + rest * 4 + rows  # in, out, weights


def test_a_shared_engram_is_one_module_and_refuses_to_decode():
    from archc.runtime.mixers import recurrent

    spec = """model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, 16)
    x += engram(x, tokens, orders=[2], heads=2, slots=31, dim=8) as memory shared
    x += swiglu(rms_norm(x), hidden=24) as mlp
    x += engram(x, tokens, orders=[2], heads=2, slots=31, dim=8) as memory shared
    return x
}
"""
    compiled = archc.compile(spec, name="shared.arch")
    model = compiled.build()
    assert compiled.num_params() == sum(p.numel() for p in model.parameters())
    assert compiled.source.count("AF.Engram(") == 1 and compiled.source.count("self.memory(x, tokens)") == 2
    with pytest.raises(NotImplementedError, match="one n-gram history cannot serve every call"):
        with recurrent(model):
            pass
