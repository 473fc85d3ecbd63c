"""Muon (against a plain reference and torch.optim.Muon), optimizer groups by role, LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECS

import archc
from archc.interop.weights import fused_layout
from archc.training.optim import (
    Muon,
    MuonWithAdamW,
    OptimizerError,
    build_optimizer,
    lr_lambda,
    newton_schulz,
    optimizer_options,
    shape_scale,
)

A, B, C = 3.4445, -4.7750, 2.0315


def reference_ns(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Keller Jordan's NS5, written out plainly."""
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / max(X.norm().item(), eps)
    for _ in range(steps):
        gram = X @ X.T
        X = A * X + (B * gram + C * gram @ gram) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def reference_muon(weights, grad_steps, lr, wd, momentum, nesterov, adjust, splits=None):
    """One parameter at a time, one formula per line: the obviously right Muon."""
    weights = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    for grads in grad_steps:
        for i, (w, g) in enumerate(zip(weights, grads)):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * bufs[i] if nesterov else bufs[i]
            w.mul_(1 - lr * wd)
            rows, cols = w.shape
            scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
            w.sub_(lr * scale * reference_ns(u))
    return weights


def run_muon(opt_factory, weights, grad_steps):
    params = [w.clone().requires_grad_() for w in weights]
    opt = opt_factory(params)
    for grads in grad_steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def random_problem(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(*s, generator=gen) * 0.1 for s in shapes]
    grads = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(steps)]
    return weights, grads


# ---------------------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_orthogonalises_with_same_singular_vectors(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == torch.float32
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.5, s
    U, _S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ O @ Vh.T  # diagonal iff O has G's singular vectors
    off = D - torch.diag(torch.diagonal(D))
    assert off.abs().max() < 1e-4
    assert torch.all(torch.diagonal(D) > 0.5)  # positive: same vectors, not flipped
    torch.testing.assert_close(O, reference_ns(G), atol=1e-5, rtol=1e-4)


def test_newton_schulz_keeps_the_dtype_given():
    G = torch.randn(32, 16)
    assert newton_schulz(G.bfloat16()).dtype == torch.bfloat16
    assert newton_schulz(torch.zeros(8, 4)).abs().max() == 0  # eps keeps 0/0 away
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(2, 3, 4))


# ---------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
def test_muon_matches_plain_reference(adjust, nesterov, steps):
    weights, grads = random_problem([(64, 32), (32, 64), (24, 24)], steps)
    kw = dict(lr=0.02, wd=0.1, momentum=0.95, nesterov=nesterov, adjust=adjust)
    want = reference_muon(weights, grads, **kw)
    got = run_muon(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                                   adjust_lr=adjust), weights, grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("steps", [1, 3])
def test_muon_matches_torch_muon(adjust, steps):
    weights, grads = random_problem([(64, 32), (32, 64), (40, 40)], steps, seed=2)
    theirs = run_muon(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust),
                      weights, grads)
    # torch runs NS in bf16: with ns_dtype="bfloat16" we are the same computation, bit for bit
    ours_bf16 = run_muon(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr=adjust, ns_dtype="bfloat16"),
                         weights, grads)
    for o, t in zip(ours_bf16, theirs):
        assert torch.equal(o, t)
    # our CPU default (fp32 NS) differs from theirs only by bf16 rounding
    ours = run_muon(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr=adjust), weights, grads)
    for o, t, w in zip(ours, theirs, weights):
        assert (o - t).abs().max() < 0.05 * (t - w).abs().max()


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_row_splits_equal_separate_parameters(adjust):
    parts = [(32, 16), (8, 16), (8, 16)]
    weights, grads = random_problem(parts, 3, seed=3)
    separate = run_muon(lambda ps: Muon(ps, lr=0.05, adjust_lr=adjust), weights, grads)
    fused_w = [torch.cat(weights)]
    fused_g = [[torch.cat(gs)] for gs in grads]
    (fused,) = run_muon(lambda ps: Muon([{"params": ps, "row_splits": [[32, 8, 8]]}], lr=0.05, adjust_lr=adjust),
                        fused_w, fused_g)
    assert torch.equal(fused, torch.cat(separate))
    (unsplit,) = run_muon(lambda ps: Muon(ps, lr=0.05, adjust_lr=adjust), fused_w, fused_g)
    assert not torch.allclose(unsplit, fused)  # splitting matters


@pytest.mark.parametrize("shape,original,match", [
    ((128, 64), math.sqrt(2), 0.2 * math.sqrt(128)),
    ((64, 128), 1.0, 0.2 * math.sqrt(128)),
])
def test_shape_scale_factors(shape, original, match):
    assert shape_scale(*shape, "original") == pytest.approx(original)
    assert shape_scale(*shape, "match_rms_adamw") == pytest.approx(match)
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    for adjust, factor in (("original", original), ("match_rms_adamw", match)):
        (p,) = run_muon(lambda ps: Muon(ps, lr=1.0, weight_decay=0.0, adjust_lr=adjust), [torch.zeros(shape)], [[g]])
        torch.testing.assert_close(p, -factor * newton_schulz(g), atol=1e-5, rtol=1e-4)


def test_muon_rejects_what_it_cannot_handle():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(2, 3, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="row_splits"):
        Muon([{"params": [torch.zeros(6, 4, requires_grad=True)], "row_splits": [[4, 4]]}])
    with pytest.raises(OptimizerError, match="did you mean `match_rms_adamw`"):
        Muon([torch.zeros(4, 4, requires_grad=True)], adjust_lr="match_rms_adam")
    with pytest.raises(OptimizerError, match="did you mean `betas`"):
        MuonWithAdamW([{"params": [torch.zeros(4, requires_grad=True)], "use_muon": False, "beta": (0.9, 0.9)}])


def test_aux_adamw_is_torch_adamw():
    weights, grads = random_problem([(16, 8), (8,)], 4, seed=5)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    theirs = run_muon(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), weights, grads)
    ours = run_muon(lambda ps: MuonWithAdamW([{"params": ps, "use_muon": False, **kw}]), weights, grads)
    for o, t in zip(ours, theirs):
        assert torch.equal(o, t)


# ---------------------------------------------------------------------------- build_optimizer


@pytest.fixture(scope="module")
def tiny():
    compiled = archc.compile(SPECS / "llama.arch", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)
    return compiled, compiled.build()


def _groups(opt):
    return {g["name"]: g["param_names"] for g in opt.param_groups}


def test_build_adamw_groups(tiny):
    compiled, model = tiny
    opt = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name="adamw", lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    groups = _groups(opt)
    assert groups["decay"] == ["embed.weight", "layers.0.attn.qkv.weight", "layers.0.attn.o.weight",
                               "layers.0.mlp.gate_up.weight", "layers.0.mlp.down.weight", "head.weight"]
    assert groups["no_decay"] == ["layers.0.attn_norm.weight", "layers.0.mlp_norm.weight", "norm.weight"]
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}


def test_build_muon_groups(tiny):
    compiled, model = tiny
    opt = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name="muon", lr=1e-3,
                          muon_lr=2e-3)
    assert isinstance(opt, MuonWithAdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["muon"]["param_names"] == ["layers.0.attn.qkv.weight", "layers.0.attn.o.weight",
                                             "layers.0.mlp.gate_up.weight", "layers.0.mlp.down.weight"]
    assert groups["muon"]["row_splits"] == [[32, 16, 16], None, [48, 48], None]
    assert groups["muon"]["use_muon"] and groups["muon"]["lr"] == 2e-3
    assert groups["muon"]["adjust_lr"] == "match_rms_adamw"
    assert groups["adamw_decay"]["param_names"] == ["embed.weight", "head.weight"]
    assert groups["adamw_decay"]["weight_decay"] == 0.1 and not groups["adamw_decay"]["use_muon"]
    assert groups["adamw_no_decay"]["param_names"] == ["layers.0.attn_norm.weight", "layers.0.mlp_norm.weight",
                                                       "norm.weight"]
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len(set(map(id, every))) == len(list(model.parameters()))

    # one object for the loop: a scheduler, clipping and a step all see it whole
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(tokens)["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 1e-3, 1e-3])


def test_build_with_tied_head():
    compiled = archc.compile(SPECS / "llama.arch", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48,
                             tie_embeddings=True)
    opt = build_optimizer(compiled.build(), compiled.param_roles(), fused_layout(compiled), name="muon")
    assert _groups(opt)["adamw_decay"] == ["embed.weight"]


def test_unknown_options_say_did_you_mean(tiny):
    compiled, model = tiny
    roles = compiled.param_roles()
    with pytest.raises(OptimizerError, match="did you mean `weight_decay`"):
        optimizer_options("adamw", weight_decy=0.1)
    with pytest.raises(OptimizerError, match="did you mean `muon`"):
        build_optimizer(model, roles, name="muonn")
    with pytest.raises(OptimizerError, match="did you mean `muon_ns_steps`"):
        build_optimizer(model, roles, name="muon", muon_nssteps=3)
    with pytest.raises(OptimizerError, match="applies to optimizer muon"):
        build_optimizer(model, roles, name="adamw", muon_lr=0.02)
    with pytest.raises(OptimizerError, match="did you mean `match_rms_adamw`"):
        optimizer_options("muon", muon_adjust_lr="match_rms")
    with pytest.raises(OptimizerError, match="no role for parameter"):
        build_optimizer(model, {k: v for k, v in roles.items() if k != "norm.weight"})
    assert optimizer_options("muon")["muon_momentum"] == 0.95


# ---------------------------------------------------------------------------- schedules


def test_cosine_schedule():
    f = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_lambda("cosine", 0, 10)(0) == 1.0


def test_wsd_and_constant_schedules():
    f = lr_lambda("wsd", warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2)
    assert f(0) == pytest.approx(0.1) and f(10) == 1.0 and f(50) == 1.0 and f(80) == 1.0
    assert f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)
    g = lr_lambda("constant", warmup=4, total=100)
    assert [g(s) for s in (0, 1, 3, 4, 99, 1000)] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(OptimizerError, match="did you mean `cosine`"):
        lr_lambda("cosin", 1, 10)
    with pytest.raises(OptimizerError, match="warmup"):
        lr_lambda("wsd", 20, 10)


def test_lambda_lr_resumes_exactly_by_step_count():
    def make():
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 3, 20))

    opt_a, sched_a = make()
    for _ in range(7):
        opt_a.step()
        sched_a.step()
    opt_b, sched_b = make()
    sched_b.load_state_dict(sched_a.state_dict())
    for _ in range(5):
        opt_a.step(), sched_a.step(), opt_b.step(), sched_b.step()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
