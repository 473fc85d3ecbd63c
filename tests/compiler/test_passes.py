"""Each pass on a small IR: what it must change, what it must keep."""

from __future__ import annotations

import pytest
import torch

import archc
from archc.compiler.ir import IRError
from archc.compiler.lower import load_spec, lower, resolve_params
from archc.compiler.passes import choose_kernels, cse, dce, fold_params, fuse_projections, infer_shapes
from archc.compiler.scalars import Unfolded
from archc.compiler.verify import verify
from archc.interop.weights import load_canonical, to_canonical


def lowered(text: str, **overrides):
    spec = load_spec(text, "t.arch")
    return lower(spec, resolve_params(spec, overrides))


def shaped(text: str, **overrides):
    return infer_shapes(fold_params(lowered(text, **overrides)))


def ops_of(graph):
    return [n.op for n in graph.nodes()]


SMALL = """
param d: int = 16
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, d)
    y = linear(x, 2 * d, bias=false)
    return y
}
"""


def test_fold_params_evaluates_expressions_and_checks_types():
    graph = lowered(SMALL, d=8)
    linear = next(n for n in graph.nodes() if n.op == "linear")
    assert isinstance(linear.attrs["out"], Unfolded)
    folded = fold_params(graph)
    linear = next(n for n in folded.nodes() if n.op == "linear")
    assert linear.attrs["out"] == 16 and linear.attrs["bias"] is False
    assert isinstance(graph.node(linear.id).attrs["out"], Unfolded)  # the pass is pure
    verify(folded, folded=True)
    with pytest.raises(archc.SpecError, match="`bias` must be a bool"):
        fold_params(lowered(SMALL.replace("bias=false", "bias=1")))


def test_infer_shapes_gives_symbolic_shapes_and_resolves_widths():
    graph = shaped("""
    model M(tokens: Tokens[B, T]) {
        x = embedding(tokens, 32, 24)
        y = attention(x, heads=4, kv_heads=2)
        return y
    }""")
    shapes = {n.path: n.shape for n in graph.nodes()}
    assert shapes["tokens"] == ("B", "T")
    assert shapes["attn.q"] == ("B", "T", 24)
    assert shapes["attn.k"] == ("B", "T", 12)  # kv_heads / heads of the width
    assert shapes["attn.o"] == ("B", "T", 24)
    verify(graph, folded=True, shaped=True)


def test_infer_shapes_reports_mismatch_with_dims():
    with pytest.raises(archc.SpecError, match=r"cannot add tensors of shapes \[B, T, 8\] and \[B, T, 16\]"):
        shaped("""
        model M(tokens: Tokens[B, T]) {
            x = embedding(tokens, 32, 8)
            y = linear(x, 16)
            z = x + y
            return z
        }""")


def test_dce_removes_unused_values_and_their_scopes():
    graph = shaped("""
    model M(tokens: Tokens[B, T]) {
        x = embedding(tokens, 32, 8)
        unused = mlp(x, hidden=16)
        y = linear(x, 4)
        return y
    }""")
    assert "mlp" in graph.scopes
    after = dce(graph)
    assert "mlp" not in after.scopes
    assert ops_of(after) == ["input", "embedding", "linear"]
    assert "mlp" in graph.scopes  # input graph untouched


def test_cse_merges_identical_pure_nodes_only():
    graph = shaped("""
    model M(tokens: Tokens[B, T]) {
        x = embedding(tokens, 32, 8)
        a = gelu(x)
        b = gelu(x)
        c = dropout(x, 0.1)
        d = dropout(x, 0.1)
        y = a + b + c + d
        return y
    }""")
    after = cse(graph)
    assert ops_of(after).count("gelu") == 1
    assert ops_of(after).count("dropout") == 2  # random: never merged
    verify(after, folded=True, shaped=True)


ATTN = """
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, 16)
    x += attention(x, heads=4, kv_heads=2, rope=true)
    x += swiglu(x, hidden=24)
    side = linear(x, 8, bias=true)
    main = linear(x, 8, bias=false)
    y = side + main
    return y
}
"""


def test_fuse_projections_fuses_qkv_and_gate_up_keeping_provenance():
    graph = shaped(ATTN)
    after = fuse_projections(graph)
    fused = {n.path: n for n in after.nodes() if n.op == "fused_linear"}
    assert set(fused) == {"attn.qkv", "mlp.gate_up"}
    assert fused["attn.qkv"].attrs["parts"] == [["q", 16], ["k", 8], ["v", 8]]
    assert [p.split(" ")[0] for p in fused["attn.qkv"].provenance] == ["attn.q", "attn.k", "attn.v"]
    # linears of one input but different bias flags stay apart
    assert sum(1 for n in after.nodes() if n.op == "linear" and n.scope == "") == 2
    verify(after, folded=True, shaped=True)


def test_fused_and_unfused_modules_compute_the_same():
    torch.manual_seed(0)
    fused = archc.compile(ATTN, name="t.arch")
    plain = archc.compile(ATTN, name="t.arch", disable=("fuse_projections",))
    a, b = fused.build(), plain.build()
    load_canonical(a, fused, to_canonical(plain, b.state_dict()))
    tokens = torch.randint(0, 32, (2, 7))
    torch.testing.assert_close(a(tokens)["y"], b(tokens)["y"])


def test_choose_kernels_picks_sdpa_and_honours_overrides():
    graph = fuse_projections(shaped(ATTN))
    chosen = choose_kernels(graph)
    core = next(n for n in chosen.nodes() if n.op == "attention_core")
    assert core.attrs["kernel"] == "sdpa" and "is_causal" in core.attrs["kernel_reason"]

    class Opts:
        kernels = {"attn": "math"}

    forced = next(n for n in choose_kernels(graph, Opts()).nodes() if n.op == "attention_core")
    assert forced.attrs["kernel"] == "math"

    class Bad:
        kernels = {"attn": "flash9"}

    with pytest.raises(archc.SpecError, match="unknown kernel"):
        choose_kernels(graph, Bad())


@pytest.mark.parametrize("causal", [True, False])
def test_every_kernel_choice_matches_the_explicit_mask_reference(causal):
    text = ATTN.replace("rope=true", f"rope=true, causal={'true' if causal else 'false'}")
    sdpa = archc.compile(text, name="t.arch")
    math = archc.compile(text, name="t.arch", kernels={"attention": "math"})
    assert "F.scaled_dot_product_attention" in sdpa.source and "AF.attention_math" in math.source
    a, b = sdpa.build(), math.build()
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 32, (2, 9))
    torch.testing.assert_close(a(tokens)["y"], b(tokens)["y"], atol=1e-5, rtol=1e-5)


LOCAL_GLOBAL = """
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, 16)
    repeat i in 0..4 as layers {
        if i == 3 { x += attention(x, heads=2) as attn } else { x += attention(x, heads=2, window=4) as attn }
    }
    x += attention(x, heads=2, window=4, dropout=0.1) as drop_attn
    return x
}
"""


def _kernels(graph):
    return {n.scope: n.attrs["kernel"] for n in graph.nodes() if n.op == "attention_core"}


def test_choose_kernels_sends_windows_to_auto_with_a_reason():
    graph = choose_kernels(fuse_projections(shaped(LOCAL_GLOBAL)))
    assert _kernels(graph) == {"layers.0.attn": "auto", "layers.1.attn": "auto", "layers.2.attn": "auto",
                               "layers.3.attn": "sdpa", "drop_attn": "auto"}
    reasons = {n.scope: n.attrs["kernel_reason"] for n in graph.nodes() if n.op == "attention_core"}
    assert reasons["layers.0.attn"].startswith("causal, window=4: at run time flex_attention")
    assert "local kernel (linear in T)" in reasons["layers.0.attn"]
    assert reasons["drop_attn"].endswith("and while dropout is on")


def test_attention_kernel_overrides_apply_where_they_fit():
    graph = fuse_projections(shaped(LOCAL_GLOBAL))

    class Opts:
        kernels = {"attention": "local", "layers.1.*": "math"}

    assert _kernels(choose_kernels(graph, Opts())) == {
        "layers.0.attn": "local", "layers.1.attn": "math", "layers.2.attn": "local", "layers.3.attn": "sdpa",
        "drop_attn": "local"}

    class Flex:
        kernels = {"attention": "flex"}

    assert _kernels(choose_kernels(graph, Flex()))["drop_attn"] == "auto"  # flex has no dropout


@pytest.mark.parametrize("pattern, kernel, why", [
    ("layers.3.*", "local", "`local` needs a window"),
    ("layers.0.attn", "sdpa", "is_causal cannot express causal, window=4"),
    ("drop_attn", "flex", "no attention dropout"),
])
def test_attention_kernel_that_cannot_run_a_layer_is_a_located_error(pattern, kernel, why):
    class Opts:
        kernels = {pattern: kernel}

    with pytest.raises(archc.SpecError, match=why) as info:
        choose_kernels(fuse_projections(shaped(LOCAL_GLOBAL)), Opts())
    assert info.value.span is not None and "can run with: auto" in info.value.hint


def test_verifier_catches_broken_ir():
    graph = shaped(SMALL)
    nodes = graph.nodes()
    nodes[-1].order = -1  # a user before its producer
    with pytest.raises(IRError, match="comes later in program order"):
        verify(graph)
    graph = shaped(SMALL)
    graph.nodes()[-1].op = "no_such_op"
    with pytest.raises(IRError, match="unknown op"):
        verify(graph)
    graph = lowered(SMALL)
    with pytest.raises(IRError, match="unfolded"):
        verify(graph, folded=True)


def test_compile_reads_as_named_passes_and_records_every_stage():
    compiled = archc.compile(ATTN, name="t.arch")
    assert [name for name, _g in compiled.stages] == [
        "lower", "fold_params", "infer_shapes", "dce", "cse", "fuse_experts", "fuse_projections",
        "choose_kernels"]
    with pytest.raises(archc.SpecError, match="did you mean `cse`"):
        archc.compile(ATTN, name="t.arch", disable=("csee",))
    with pytest.raises(archc.SpecError, match="required"):
        archc.compile(ATTN, name="t.arch", disable=("infer_shapes",))


def test_compile_pauses_the_cyclic_collector_and_restores_it():
    # The collector's full passes over every stage's IR made fuse_experts 66x slower at 128 layers than at 8.
    import gc

    seen = []
    archc.compile(ATTN, name="t.arch", on_stage=lambda _name, _g: seen.append(gc.isenabled()))
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(archc.SpecError):
        archc.compile(ATTN + "\nmodel Broken(", name="t.arch")
    assert gc.isenabled()
    gc.disable()
    try:
        archc.compile(ATTN, name="t.arch")
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


# Regression (issue "A language, not a menu"): two layers each cross-attending to one `memory` made the fused
# K/V of layer 1 land inside layer 0 in program order, and code generation stopped with a KeyError.
CROSS = """
param d: int = 32
block Layer(x: Tensor[B, T, d], memory: Tensor[B, S, d]) {
    x += cross_attention(rms_norm(x), memory, heads=4)
    return x
}
model M(tokens: Tokens[B, T], memory: Tensor[B, S, d]) {
    x = embedding(tokens, 64, d)
    repeat i in 0..2 as layers {
        x = Layer(x, memory)
    }
    return x
}
"""


def test_cross_attention_layers_on_one_memory_fuse_their_own_keys_and_values():
    torch.manual_seed(0)
    fused = archc.compile(CROSS, name="t.arch")
    plain = archc.compile(CROSS, name="t.arch", disable=("fuse_projections",))
    # each layer owns its K/V weights, so each fuses its own (no matmul across layers)
    assert [n.path for n in fused.ir.nodes() if n.op == "fused_linear"] == \
        ["layers.0.cross_attn.kv", "layers.1.cross_attn.kv"]
    assert fused.num_params() == plain.num_params()
    assert "for layer in self.layers:\n            x = layer(x, memory)" in fused.source  # memory: the same each step
    assert fused.source.count("class Layer(") == 1
    a, b = fused.build(), plain.build()
    load_canonical(a, fused, to_canonical(plain, b.state_dict()))
    tokens, memory = torch.randint(0, 64, (2, 5)), torch.randn(2, 3, 32)
    torch.testing.assert_close(a(tokens, memory)["x"], b(tokens, memory)["x"])


@pytest.mark.parametrize("command, extra", [("check", []), ("summary", ["--dim", "S=4"]), ("inspect", []),
                                            ("inspect", ["ir"])])
def test_cross_attention_layers_on_one_memory_pass_every_command(command, extra, tmp_path, capsys):
    from archc.cli import main

    spec = tmp_path / "cross.arch"
    spec.write_text(CROSS)
    assert main([command, str(spec), *extra]) == 0, capsys.readouterr().err


def test_verifier_catches_a_module_split_in_program_order():
    graph = fuse_projections(shaped(CROSS))
    (layer1_kv,) = [n for n in graph.nodes() if n.path == "layers.1.cross_attn.kv"]
    layer1_kv.order = next(n.order for n in graph.nodes() if n.path == "layers.0.cross_attn.o") + 0.5
    with pytest.raises(IRError, match="keep each module's nodes together"):
        verify(graph)
