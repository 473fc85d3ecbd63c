"""The static analyses (`flops`, `num_params`, `summary`) and the IR shapes agree with the built module.

* FLOPs: `compiled.flops(B, T)` is checked against `torch.utils.flop_counter.FlopCounterMode`
  on the built module's forward, exactly. One subtlety (a torch limitation, not an archc one):
  on CPU, `F.scaled_dot_product_attention` dispatches to
  `aten._scaled_dot_product_flash_attention_for_cpu`, which has no entry in torch's FLOP
  registry, so FlopCounterMode counts the attention products as 0 there. The exact checks
  therefore run SDPA with the math back end (`sdpa_kernel(SDPBackend.MATH)`, which decomposes
  into counted `bmm`s) or compile with the explicit `math` kernel; `test_cpu_flash_sdpa_gap`
  pins the gap down to exactly the attention FLOPs.
* Parameters: `num_params()` equals the module's (deduplicated, so tied weights count once)
  parameter count; the summary table's rows sum to their parents and to the total.
* Shapes: each generated module is traced with torch.fx (RotaryEmbedding kept as a leaf: tracing
  into it would put Proxy keys into its cos/sin cache) and run through ShapeProp; every linear and
  fused linear of the IR must appear in the traced graph with the IR's shape, split pieces included.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import archc
from archc.compiler import analysis
from archc.runtime.functional import RotaryEmbedding

SPECS = Path(__file__).resolve().parents[2] / "specs"

# (spec, overrides, batch, seq): MHA / GQA / MQA, tied / untied, odd and even lengths.
CASES = [
    ("gpt2", {}, 2, 16),  # tied head, biases, MHA
    ("gpt2", {"n_layers": 2, "n_heads": 2}, 3, 37),
    ("gpt2", {"d_model": 96, "n_heads": 3, "n_layers": 1}, 1, 64),
    ("llama", {}, 2, 16),  # GQA 4 heads / 2 kv heads, untied
    ("llama", {"n_kv_heads": 1}, 3, 37),  # MQA
    ("llama", {"n_kv_heads": 4, "n_layers": 2}, 2, 9),  # MHA
    ("llama", {"tie_embeddings": True, "n_layers": 2}, 1, 64),  # tied
    ("llama", {"d_model": 64, "n_heads": 8, "n_kv_heads": 2, "d_ff": 160, "n_layers": 3}, 2, 5),
]
IDS = [f"{s}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}-B{b}T{t}" for s, o, b, t in CASES]


@functools.cache
def _compiled(spec: str, items: tuple, kernel: str | None = None):
    return archc.compile(SPECS / f"{spec}.arch", dict(items), kernels={"*": kernel} if kernel else None)


def compiled_for(spec, overrides, kernel=None):
    return _compiled(spec, tuple(sorted(overrides.items())), kernel)


def built(compiled):
    torch.manual_seed(0)
    return compiled.build()


def tokens_for(compiled, batch, seq):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, compiled.params["vocab"], (batch, seq), generator=g)


def counted_flops(model, tokens, backend=None, backward=False) -> int:
    counter = FlopCounterMode(display=False)
    ctx = sdpa_kernel(backend) if backend is not None else _null()
    with counter, ctx, torch.set_grad_enabled(backward):
        out = model(tokens)
        if backward:
            out["loss"].backward()
    return counter.get_total_flops()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def attention_flops(compiled, batch, seq) -> int:
    sizes = analysis.sizes_for(compiled.ir, batch, seq)
    return sum(analysis.node_cost(compiled.ir, n, sizes)[1] for n in compiled.ir.nodes() if n.op == "attention_core")


# ---- FLOPs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, overrides, batch, seq", CASES, ids=IDS)
def test_forward_flops_equal_flop_counter(spec, overrides, batch, seq):
    compiled = compiled_for(spec, overrides)
    model = built(compiled).eval()
    counted = counted_flops(model, tokens_for(compiled, batch, seq), backend=SDPBackend.MATH)
    assert compiled.flops(batch, seq) == counted


@pytest.mark.parametrize("spec, overrides, batch, seq", [CASES[1], CASES[4]], ids=[IDS[1], IDS[4]])
def test_forward_flops_equal_flop_counter_math_kernel(spec, overrides, batch, seq):
    """With archc's explicit `math` kernel no back-end choice is involved at all."""
    compiled = compiled_for(spec, overrides, kernel="math")
    assert "AF.attention_math(" in compiled.source
    model = built(compiled).eval()
    assert compiled.flops(batch, seq) == counted_flops(model, tokens_for(compiled, batch, seq))


@pytest.mark.parametrize("spec, overrides, batch, seq", [CASES[0], CASES[4], CASES[6]], ids=[IDS[0], IDS[4], IDS[6]])
def test_train_flops_are_three_times_forward(spec, overrides, batch, seq):
    """The summary's `train FLOPs (3x)` and the benchmarks' MFU rest on this: fwd + bwd = 3 x fwd, exactly."""
    compiled = compiled_for(spec, overrides)
    model = built(compiled).train()
    counted = counted_flops(model, tokens_for(compiled, batch, seq), backend=SDPBackend.MATH, backward=True)
    assert counted == 3 * compiled.flops(batch, seq)


@pytest.mark.parametrize("spec, overrides, batch, seq", [CASES[0], CASES[4]], ids=[IDS[0], IDS[4]])
def test_cpu_flash_sdpa_gap(spec, overrides, batch, seq):
    """On CPU the default SDPA back end is invisible to FlopCounterMode: the gap is exactly attention.

    If torch starts counting `_scaled_dot_product_flash_attention_for_cpu`, the gap becomes 0.
    """
    compiled = compiled_for(spec, overrides)
    model = built(compiled).eval()
    counted = counted_flops(model, tokens_for(compiled, batch, seq))  # default back end
    attn = attention_flops(compiled, batch, seq)
    assert attn > 0
    assert compiled.flops(batch, seq) - counted in (0, attn)


# ---- parameters and the summary table ------------------------------------------------------------


@pytest.mark.parametrize("spec, overrides, batch, seq", CASES, ids=IDS)
def test_num_params_equals_module(spec, overrides, batch, seq):
    compiled = compiled_for(spec, overrides)
    model = built(compiled)
    assert compiled.num_params() == sum(p.numel() for p in model.parameters())
    # the canonical (unfused) names cover the same weights
    assert compiled.num_params() == sum(torch.Size(s).numel() for s in compiled.canonical_names().values())


_ROW = re.compile(r"^( *)(\S+)\s+(\S+)\s+(\[.*?\])\s+([\d,]+)\s+\S+\s+\S+$")


def _parse_table(text):
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line.replace(" ", "")) == {"-"}]
    assert len(rules) == 2, text
    rows = []
    for line in lines[rules[0] + 1:rules[1]]:
        m = _ROW.match(line)
        assert m, f"unparsable summary row: {line!r}"
        rows.append((len(m.group(1)) // 2 + 1, m.group(2), int(m.group(5).replace(",", ""))))
    total = int(re.search(r"total params\s+([\d,]+)", text).group(1).replace(",", ""))
    return rows, total


@pytest.mark.parametrize("spec, overrides, batch, seq", [CASES[0], CASES[3], CASES[6]], ids=[IDS[0], IDS[3], IDS[6]])
@pytest.mark.parametrize("depth", [1, 3])
def test_summary_params_sum_to_total(spec, overrides, batch, seq, depth):
    compiled = compiled_for(spec, overrides)
    rows, total = _parse_table(compiled.summary(batch, seq, depth=depth))
    assert total == compiled.num_params()
    assert sum(p for d, _name, p in rows if d == 1) == total
    # each module row is the sum of the rows directly below it
    for i, (d, name, params) in enumerate(rows):
        children = []
        for d2, _n2, p2 in rows[i + 1:]:
            if d2 <= d:
                break
            if d2 == d + 1:
                children.append(p2)
        if children:
            assert sum(children) == params, name
    # the same holds for FLOPs, exactly, in the rows behind the table
    data = analysis.rows(compiled.ir, batch, seq, depth=1)
    assert sum(r.flops for r in data[1:]) == data[0].flops == compiled.flops(batch, seq)


def test_tied_linear_with_bias_has_a_bias_of_its_own(tmp_path):
    # BERT's and ALBERT's MLM decoders: the weight is the word embeddings', the bias the decoder's own,
    # and num_params counts it (and only it) once.
    text = (SPECS / "gpt2.arch").read_text()
    text = text.replace("linear(x, vocab, bias=false, tie=wte)", "linear(x, vocab, bias=true, tie=wte)")
    assert "bias=true, tie=wte" in text
    path = tmp_path / "gpt2_tied_bias.arch"
    path.write_text(text)
    compiled = archc.compile(path, n_layers=1)
    plain = archc.compile(SPECS / "gpt2.arch", n_layers=1)
    assert compiled.num_params() == plain.num_params() + compiled.params["vocab"]
    model = compiled.build()
    assert sum(p.numel() for p in model.parameters()) == compiled.num_params()
    head = next(n for n in compiled.ir.nodes() if n.op == "linear" and n.attrs.get("tie"))
    assert f"{head.path}.bias" in model.state_dict()
    assert compiled.param_roles()[f"{head.path}.bias"] == "bias"


# ---- torch.fx: traced shapes agree with the IR ---------------------------------------------------


class LeafRopeTracer(fx.Tracer):
    """RotaryEmbedding caches cos/sin keyed on the length; tracing into it would cache Proxies."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, RotaryEmbedding) or super().is_leaf_module(m, qualname)


def _shape(node):
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)


@pytest.mark.parametrize("spec, overrides, batch, seq", CASES, ids=IDS)
def test_fx_traced_shapes_match_ir(spec, overrides, batch, seq):
    compiled = compiled_for(spec, overrides)
    model = built(compiled).eval()
    gm = fx.GraphModule(model, LeafRopeTracer().trace(model))
    tokens = tokens_for(compiled, batch, seq)
    ShapeProp(gm).propagate(tokens)
    with torch.no_grad():  # the traced program computes what the module computes
        torch.testing.assert_close(gm(tokens)["logits"], model(tokens)["logits"], rtol=0, atol=0)

    sizes = {"B": batch, "T": seq}
    resolve = lambda shape: tuple(sizes[d] if isinstance(d, str) else d for d in shape)  # noqa: E731
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    modules = dict(model.named_modules())
    ir = compiled.ir
    checked = 0
    for node in ir.nodes():
        if node.op in ("linear", "fused_linear") and not node.attrs.get("tie"):
            assert node.path in calls, f"{node.op} {node.path} is not called as a module in the traced graph"
            fx_node = calls[node.path]
            assert isinstance(modules[node.path], torch.nn.Linear)
            assert _shape(fx_node) == resolve(node.shape), node.path
            assert _shape(fx_node)[-1] == (node.attrs["out"] if node.op == "linear"
                                           else sum(size for _n, size in node.attrs["parts"]))
            checked += 1
            if node.op == "fused_linear":  # the split pieces, in order, have the split_part shapes
                (split,) = [u for u in fx_node.users if u.op in ("call_method", "call_function")
                            and "split" in str(u.target)]
                got = {u.args[1]: _shape(u) for u in split.users}
                parts = sorted((ir.node(u) for u in ir.users(node.id)), key=lambda n: n.attrs["index"])
                assert [got[p.attrs["index"]] for p in parts] == [resolve(p.shape) for p in parts]
        elif node.op == "linear":  # tied: F.linear on the tied module's weight
            tied = ir.node(node.attrs["tie"])
            fx_linears = [n for n in gm.graph.nodes  # F.linear is torch._C._nn.linear
                          if n.op == "call_function" and getattr(n.target, "__name__", "") == "linear"]
            match = [n for n in fx_linears if n.args[1].op == "get_attr" and n.args[1].target == f"{tied.path}.weight"]
            assert len(match) == 1, f"tied linear {node.path}: no F.linear on {tied.path}.weight"
            assert _shape(match[0]) == resolve(node.shape)
            checked += 1
        elif node.path in calls and node.op != "input":  # norms, embeddings: leaf modules with IR shapes
            assert _shape(calls[node.path]) == resolve(node.shape), node.path
    n_linear_modules = sum(isinstance(modules[t], torch.nn.Linear) for t in calls)
    n_ir_linears = sum(n.op in ("linear", "fused_linear") and not n.attrs.get("tie") for n in ir.nodes())
    assert n_linear_modules == n_ir_linears
    assert checked == sum(n.op in ("linear", "fused_linear") for n in ir.nodes())

    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    meta = out.meta["tensor_meta"]
    for name, node_id in ir.outputs:
        assert tuple(meta[name].shape) == resolve(ir.node(node_id).shape), name
