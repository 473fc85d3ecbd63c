"""Gated paths (`gated(x, branches=[...], mode=...)`): numerics against plain references, errors, summary, training."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import archc
from archc.cli.main import main
from archc.dsl.diagnostics import SpecError
from archc.interop.weights import load_canonical, to_canonical

BRANCHES = """
param d: int = 16

block Attn(x: Tensor[B, T, d]) {
    return attention(x, heads=2, rope=true) as attn
}

block Mixer(x: Tensor[B, T, d]) {
    return linear_attn(x, heads=2) as attn
}

block Small(x: Tensor[N, d]) {
    return mlp(x, hidden=8, act="relu") as mlp
}

block Big(x: Tensor[N, d]) {
    return mlp(x, hidden=24, act="relu") as mlp
}
"""


def layer(call: str, **overrides):
    text = BRANCHES + f"\nmodel M(x: Tensor[B, T, d]) {{\n    y = {call} as g\n    return y\n}}\n"
    compiled = archc.compile(text, overrides, name="gated.arch")
    torch.manual_seed(0)
    model = compiled.build().double()
    return compiled, model, to_canonical(compiled, dict(model.named_parameters()))


def mlp_by_hand(w, prefix, x):
    """A row branch written out: relu MLP from its canonical weights."""
    h = torch.relu(x @ w[prefix + "mlp.fc.weight"].T + w[prefix + "mlp.fc.bias"])
    return h @ w[prefix + "mlp.proj.weight"].T + w[prefix + "mlp.proj.bias"]


def branch_outputs(model, w, x, kinds):
    """Each branch's output for every token, as the semantics say: a sequence branch on the whole sequence, a row
    branch on each token by itself (written out by hand)."""
    outs = []
    for b, kind in enumerate(kinds):
        if kind == "seq":
            outs.append(model.g.branches[b](x))
        else:
            outs.append(torch.stack([torch.stack([mlp_by_hand(w, f"g.branches.{b}.", x[i, t])
                                                  for t in range(x.shape[1])]) for i in range(x.shape[0])]))
    return outs


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_select_matches_a_per_token_loop_forward_and_backward(gate):
    kinds = ["seq", "row", "seq", "row"]
    compiled, model, w = layer(f'gated(x, branches=[Attn, Small, Mixer, Big], mode="select", top_k=2, gate="{gate}")')
    assert "AF.routed_rows" in compiled.source and "AF.dispatch_rows" in compiled.source
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y = model(x)["y"]
    outs = branch_outputs(model, w, x, kinds)
    gate_w = w["g.router.gate.weight"]
    expected = torch.zeros_like(y)
    for i in range(2):
        for t in range(9):
            logits = gate_w @ x[i, t]
            if gate == "softmax":  # Shazeer: softmax over the kept top-k logits
                top = logits.topk(2)
                weights, chosen = torch.softmax(top.values, -1), top.indices
            else:  # sigmoid affinities of the chosen branches, renormalised
                scores = torch.sigmoid(logits)
                chosen = scores.topk(2).indices
                weights = scores[chosen] / scores[chosen].sum()
            for wj, b in zip(weights, chosen.tolist()):
                expected[i, t] = expected[i, t] + wj * outs[b][i, t]
    # the router computes its gates in fp32 (as the experts'), the rest runs in fp64 here
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    params = [p for _n, p in model.named_parameters()]
    got = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for (name, _p), a, b in zip(model.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_select_runs_a_row_branch_on_its_routed_rows_only():
    _compiled, model, _w = layer('gated(x, branches=[Attn, Small, Big], mode="select")')
    seen = {}
    for b in (1, 2):
        model.g.branches[b].register_forward_hook(lambda m, args, out, b=b: seen.__setitem__(b, args[0].shape[0]))
    model(torch.randn(3, 5, 16, dtype=torch.float64))
    load = model.g.router.stats["load"]
    assert sum(load) == 15 and seen == {1: load[1], 2: load[2]}


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_mix_is_the_explicit_weighted_sum(gate):
    _compiled, model, w = layer(f'gated(x, branches=[Attn, Small, Mixer], gate="{gate}")')
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y = model(x)["y"]
    outs = branch_outputs(model, w, x, ["seq", "row", "seq"])
    logits = x @ w["g.gate.weight"].T
    g = torch.softmax(logits, -1) if gate == "softmax" else torch.sigmoid(logits)
    expected = sum(g[..., b:b + 1] * outs[b] for b in range(3))
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
    params = [p for _n, p in model.named_parameters()]
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_mix_per_head_weights_each_head_by_its_own_gate():
    _compiled, model, w = layer('gated(x, branches=[Attn, Mixer], gate="sigmoid", heads=4)')
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = model(x)["y"]
    a, m = model.g.branches[0](x), model.g.branches[1](x)
    g = torch.sigmoid(x @ w["g.gate.weight"].T).view(2, 5, 4, 2)  # [heads, branches]
    expected = (a.view(2, 5, 4, 4) * g[..., :1] + m.view(2, 5, 4, 4) * g[..., 1:]).reshape(2, 5, 16)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)


def test_select_adds_the_balance_loss_and_counts_active_parameters():
    text = BRANCHES + """
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, d)
    x += gated(x, branches=[Attn, Small, Big], mode="select", top_k=1) as g
    logits = linear(x, 32)
    loss = next_token_loss(logits, tokens)
    return logits, loss
}
"""
    compiled = archc.compile(text, name="gated.arch")
    assert compiled.source.count("AF.moe_aux_loss(self)") == 1
    model = compiled.build()
    tokens = torch.randint(0, 32, (2, 6))
    out = model(tokens)
    plain = F.cross_entropy(out["logits"][:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out["loss"], plain + model.g.router.aux_loss)
    assert model.g.router.aux_loss > 0
    summary = compiled.summary()
    small, big = (sum(p.numel() for p in model.g.branches[b].parameters()) for b in (1, 2))
    total = sum(p.numel() for p in model.parameters())
    active = round(total - (small + big) * (1 - 1 / 3))
    assert f"active params       {active:,}" in summary
    assert "g: select top-1 of 3 branches [Attn, Small, Big] per token, softmax gate" in summary


def test_a_gated_model_decodes_token_by_token():
    from archc.runtime.mixers import recurrent

    _compiled, model, _w = layer('gated(x, branches=[Attn, Small, Mixer], mode="select", top_k=2)')
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    full = model(x)["y"]
    with recurrent(model):
        steps = torch.cat([model(x[:, :4])["y"], *(model(x[:, t:t + 1])["y"] for t in range(4, 8))], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)  # the router's gates are fp32


@pytest.mark.parametrize("call, at, words", [
    ("gated(x, branches=[Attn, Smal])", "Smal", ("no block here is called `Smal`", "did you mean `Small`")),
    ('gated(x, branches=[Attn, Small], mode="select", top_k=3)', "3",
     ("top_k=3 is larger than the number of branches (2)",)),
    ('gated(x, branches=[Attn, Small], mode="selct")', '"selct"', ('must be one of "mix", "select"',
                                                                   'did you mean "select"')),
    ("gated(x, branches=[Attn, Small], top_k=2)", "2)", ('`top_k=` applies to mode="select"',)),
    ('gated(x, branches=[Attn, Small], mode="select", heads=2)', "2)", ('`heads=` applies to mode="mix"',)),
    ('gated(x, branches=[Attn, Small], mode="select", bias=true)', "true)", ('`bias=` applies to mode="mix"',)),
    ("gated(x, branches=[Attn])", "[Attn]", ("at least 2 branches",)),
    ("gated(x, branches=Attn)", "Attn", ("a list of blocks",)),
    ('gated(x, branches=[Attn, Small], gate="relu")', '"relu"', ('`gate` must be one of "softmax", "sigmoid"',)),
    ('gated(x, branches=[Attn, Small], mode="select", balance="aux_free")', '"aux_free"',
     ('aux-free balancing (a selection bias) needs gate="sigmoid"',)),
    ("gated(x, branches=[Attn, Mixer], heads=3)", "gated", ("heads=3 must divide the branches' output width 16",)),
])
def test_bad_arguments_are_located_errors(call, at, words):
    with pytest.raises(SpecError) as info:
        layer(call)
    err = getattr(info.value, "errors", None)
    span = (err[0] if err else info.value).span
    text = str(info.value)
    assert (span.line, span.column) == (21, len("    y = ") + call.index(at) + 1), text
    for word in words:
        assert word in text, text


def test_identical_row_branches_stay_modules_of_their_own():
    compiled, model, _w = layer('gated(x, branches=[Small, Small], mode="select")')
    assert "GroupedLinear" not in compiled.source and "branch(rows) for branch, rows in zip(self.branches" in \
        compiled.source
    assert "g.branches.1.mlp.fc.weight" in to_canonical(compiled, model.state_dict())


@pytest.mark.parametrize("block, words", [
    ("block Two(x: Tensor[B, T, d], y: Tensor[B, T, d]) {\n    return x + y\n}\n",
     "branch `Two` must take one tensor (the layer's input) and nothing else without a default; it takes x, y"),
    ("block Two(x: Tensor[B, T, d]) {\n    return x, x\n}\n", "branch `Two` must return one tensor"),
])
def test_a_branch_must_map_one_tensor_to_one(block, words):
    text = BRANCHES + block + "model M(x: Tensor[B, T, d]) {\n    return gated(x, branches=[Attn, Two])\n}\n"
    with pytest.raises(SpecError, match=re.escape(words)):
        archc.compile(text, name="gated.arch")


def test_a_select_branch_of_another_width_is_refused():
    text = BRANCHES + """
block Wider(x: Tensor[N, d]) {
    return linear(x, 2 * d)
}

model M(x: Tensor[B, T, d]) {
    return gated(x, branches=[Small, Wider], mode="select")
}
"""
    with pytest.raises(SpecError, match=r"the branches \(each must return its input's width\) return different "
                                        r"widths \[16, 32\]"):
        archc.compile(text, name="gated.arch")
    with pytest.raises(SpecError, match="they are 32 wide and the input is 16; each branch must return its input's"):
        archc.compile(text.replace("Small, Wider", "Wider, Wider"), name="gated.arch")


def test_gated_paths_spec_trains_and_logs_router_statistics(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(SPECS / "gated_paths.arch"), "--steps", "3", "-D", "n_layers=1", "-D", "d_model=32",
            "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress",
            "--out-dir", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3
    stats = rows[-1]["moe"]
    assert set(stats) == {"layers.0.mixer.router", "layers.0.mlp.router"}
    for s in stats.values():
        assert sum(s["load"]) == 2 * 16 and len(s["load"]) == 2 and s["aux_loss"] > 0


# ---- NSA written as gated paths (specs/nsa_gated.arch) == the nsa mixer (specs/nsa.arch) ----------------------

NSA_SIZES = dict(n_layers=2, d_model=32, n_heads=4, kv_heads=2, head_dim=8, cmp_block=8, stride=4, select_block=8,
                 top_n=3, window=12, d_ff=48)


def nsa_copies(name: str) -> list[str]:
    """Where the gated model keeps each weight of the nsa model: the queries in every branch, the compressed keys
    and their compressor also in the selection branch (to score its blocks)."""
    if ".mixer." not in name:
        return [name]
    layer, rest = name.split(".mixer.")
    branch = lambda b, key: f"{layer}.mixer.branches.{b}.attn.{key}"  # noqa: E731
    if rest == "g.weight":
        return [f"{layer}.mixer.gate.weight"]  # [heads, 3] logits: the layout gated's [heads, branches] takes
    if rest == "o.weight":
        return [f"{layer}.o.weight"]
    if rest == "q.weight":
        return [branch(b, rest) for b in range(3)]
    if rest.startswith(("k_cmp.", "core.k_compress.")):
        return [branch(0, rest), branch(1, rest)]
    if rest.startswith(("v_cmp.", "core.v_compress.")):
        return [branch(0, rest)]
    return [branch(1 if "_slc" in rest else 2, rest)]


@pytest.mark.parametrize("kernel, layers, length", [("auto", 2, 40), ("reference", 1, 32)])
def test_nsa_as_gated_paths_equals_the_nsa_mixer_forward_and_backward(kernel, layers, length):
    sizes, kernels = {**NSA_SIZES, "n_layers": layers}, {"nsa": kernel}
    nsa = archc.compile(SPECS / "nsa.arch", sizes, kernels=kernels)
    gated = archc.compile(SPECS / "nsa_gated.arch", sizes, kernels=kernels)
    assert gated.source.count("AF.NSABranchCore(") == 3 and f"kernel='{kernel}'" in gated.source
    torch.manual_seed(0)
    a, b = nsa.build().double(), gated.build().double()
    weights = to_canonical(nsa, a.state_dict())
    load_canonical(b, gated, {copy: w for name, w in weights.items() for copy in nsa_copies(name)})
    tokens = torch.randint(0, 256, (2, length))  # longer than top_n · select_block = 24: the selection is sparse
    out_a, out_b = a(tokens), b(tokens)
    # both compute each branch in fp32 (the kernels' precision); the gated sum runs in the model's dtype
    torch.testing.assert_close(out_b["logits"], out_a["logits"], rtol=1e-5, atol=1e-6)
    grads_a = dict(zip([n for n, _p in a.named_parameters()], torch.autograd.grad(out_a["loss"], list(a.parameters()))))
    params_b = list(b.named_parameters())
    grads_b = torch.autograd.grad(out_b["loss"], [p for _n, p in params_b], allow_unused=True)
    grads_b = {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(params_b, grads_b)}
    ga, gb = to_canonical(nsa, grads_a), to_canonical(gated, grads_b)
    for name, grad in ga.items():  # a weight used by several branches gets the sum of their gradients
        torch.testing.assert_close(sum(gb[copy] for copy in nsa_copies(name)), grad, rtol=1e-5, atol=1e-7, msg=name)
    scorers = [copy for name in ga if name.split(".mixer.")[-1].startswith(("k_cmp.", "core.k_compress."))
               for copy in nsa_copies(name) if ".branches.1." in copy]
    assert scorers and all(not gb[s].any() for s in scorers)  # the selection's scoring copy gets no gradient


def test_nsa_as_gated_paths_decodes_token_by_token():
    from archc.runtime.mixers import recurrent

    compiled = archc.compile(SPECS / "nsa_gated.arch", {**NSA_SIZES, "n_layers": 1})
    torch.manual_seed(0)
    model = compiled.build().double().eval()
    tokens = torch.randint(0, 256, (1, 36))
    full = model(tokens)["logits"]
    with recurrent(model):
        steps = torch.cat([model(tokens[:, :30])["logits"], *(model(tokens[:, t:t + 1])["logits"]
                                                              for t in range(30, 36))], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-6, atol=1e-7)  # the branches compute in fp32
