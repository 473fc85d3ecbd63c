"""Native Sparse Attention: the gather path against the per-query reference, the selection rule,
the full-attention limit, each branch alone (`nsa_branch`), the compiled mixer (kernel choice, FLOPs, summary) and
its errors.

Shapes are tiny (T <= 70); the reference loops over query positions. The file runs in a few seconds, on one
thread: with two, each of the reference's many tiny ops waits on OpenMP threads that other jobs on a busy
machine keep busy (20x slower here).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import archc
from archc.compiler import analysis
from archc.kernels import nsa
from archc.kernels.nsa import (
    block_importance,
    compressed_blocks,
    nsa_attention,
    nsa_gather,
    nsa_reference,
    resolve_kernel,
    select_blocks,
    triton_unsupported,
)

NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def inputs(B, T, HQ, H, K, V, block, stride, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Nc = compressed_blocks(T, block, stride)

    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    gates = [torch.rand(B, T, HQ, generator=gen).requires_grad_() for _ in range(3)]
    return [r(B, T, HQ, K), r(B, Nc, H, K), r(B, Nc, H, V), r(B, T, H, K), r(B, T, H, V), r(B, T, H, K),
            r(B, T, H, V), *gates]


# (B, T, HQ, H, K, V, block, stride, select_block, top_n, window)
CASES = {
    "T1": (1, 1, 2, 2, 8, 8, 8, 4, 8, 3, 4),
    "T37_group2_ragged": (2, 37, 4, 2, 16, 8, 8, 4, 8, 3, 5),
    "T45_group1": (1, 45, 2, 2, 8, 8, 8, 8, 8, 4, 9),
    "T70_group4_sparse": (1, 70, 8, 2, 16, 16, 16, 8, 16, 4, 20),
    "T50_cmp_block_wider_than_selection": (1, 50, 4, 1, 8, 8, 16, 8, 8, 5, 6),
}


def check_against_reference(case, chunk=16, scale=None, dtype=torch.float32, tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-5)):
    """nsa_gather on inputs of `dtype` against the reference in fp32 on the same values: blocks, outputs, gradients.

    `case` names one of CASES or is such a tuple itself."""
    B, T, HQ, H, K, V, block, stride, sel, n, w = CASES[case] if isinstance(case, str) else case
    xs = inputs(B, T, HQ, H, K, V, block, stride)
    kw = dict(block=block, stride=stride, select_block=sel, top_n=n, window=w, scale=scale)
    low = [x.detach().to(dtype).requires_grad_() for x in xs]
    ref = [x.detach().float().requires_grad_() for x in low]
    o_ref, idx_ref = nsa_reference(*ref, **kw, return_block_indices=True)
    o, idx = nsa_gather(*low, **kw, chunk=chunk, return_block_indices=True)
    assert torch.equal(idx, idx_ref)
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), o_ref, rtol=tol[0], atol=tol[1])
    do = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad((o_ref * do).sum(), ref, allow_unused=True)
    g = torch.autograd.grad((o.float() * do).sum(), low, allow_unused=True)
    for name, a, b in zip(NAMES, g, g_ref):
        if b is None:  # no compressed blocks at all (T < block)
            assert a is None or not a.numel() or not a.any(), name
            continue
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), b, rtol=grad_tol[0], atol=grad_tol[1],
                                   msg=lambda m: f"{case}: d{name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_gather_path_matches_reference_outputs_blocks_and_gradients(case):
    check_against_reference(case)  # chunks of 16 queries: several, the last one short, when T > 16


def test_gather_path_with_a_scale_and_values_wider_than_keys():
    # V > K: the window branch pads q and k to V's width and rescales q for SDPA's D^-1/2
    check_against_reference((1, 29, 4, 2, 8, 16, 8, 4, 8, 3, 7), chunk=None, scale=0.3)


def test_gather_path_chunks_from_its_memory_budget(monkeypatch):
    # a tiny budget: chunks of 21 queries for the compression branch and of 1 for the selection, instead of the
    # single chunk that tiny shapes get
    monkeypatch.setattr(nsa, "CHUNK_FLOATS", 4096)
    check_against_reference("T37_group2_ragged", chunk=None)


def test_gather_path_in_bf16():
    # bf16 in and out, fp32 inside: against the fp32 reference on the same rounded values, to bf16's precision
    check_against_reference("T37_group2_ragged", dtype=torch.bfloat16, tol=(2e-2, 2e-2), grad_tol=(2e-2, 2e-2))


def test_sparse_cases_really_skip_blocks():
    B, T, HQ, H, K, V, block, stride, sel, n, w = CASES["T70_group4_sparse"]
    xs = inputs(B, T, HQ, H, K, V, block, stride)
    _o, idx = nsa_gather(*xs, block=block, stride=stride, select_block=sel, top_n=n, window=w,
                         return_block_indices=True)
    last = idx[0, -1, 0]
    assert (last >= 0).sum() == n < -(-T // sel)  # 4 of 5 blocks
    assert {0, (T - 1) // sel, (T - 1) // sel - 1} <= set(last.tolist())  # first and local blocks forced


def test_selection_equals_full_causal_attention_when_everything_is_selected():
    """With top_n · select_block >= T and window >= T, the selection and the window branch are causal attention."""
    B, T, HQ, H, K = 2, 45, 4, 2, 16
    xs = inputs(B, T, HQ, H, K, K, 8, 4, seed=3)
    q, k, v = xs[0], xs[3], xs[4]
    full = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    one, zero = torch.ones(B, T, HQ), torch.zeros(B, T, HQ)
    kw = dict(block=8, stride=4, select_block=8, top_n=6, window=T)  # 6 · 8 = 48 >= 45
    for face in (nsa_gather, nsa_reference):
        slc = face(*xs[:7], zero, one, zero, **kw)
        torch.testing.assert_close(slc, full, rtol=1e-5, atol=1e-5)
        win = face(*xs[:5], k, v, zero, zero, one, **kw)
        torch.testing.assert_close(win, full, rtol=1e-5, atol=1e-5)
    # with one block fewer the selection is sparse for the last queries and differs
    sparse = nsa_gather(*xs[:7], zero, one, zero, **dict(kw, top_n=5))
    assert not torch.allclose(sparse[:, -1], full[:, -1], atol=1e-3)


def test_block_importance_is_the_overlap_sum():
    # cmp_block 32, stride 16, select_block 64: compression block i covers [16i, 16i + 32)
    p = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])  # blocks 0..6
    imp = block_importance(p, 3, 32, 16, 64)
    # selection block 0 = [0, 64): blocks 0..3; block 1 = [64, 128): blocks 3..6 (3 covers [48, 80)); block 2: none
    assert imp.tolist() == [1 + 2 + 4 + 8, 8 + 16 + 32 + 64, 0.0]
    # coinciding blockings: importance is p itself
    assert torch.equal(block_importance(p, 7, 16, 16, 16), p)


def test_select_blocks_forces_first_and_local_and_ranks_the_rest():
    imp = torch.tensor([0.0, 0.9, 0.1, 0.5, 0.0, 0.0, 0.3])
    assert sorted(select_blocks(imp, torch.tensor(6 * 4 + 1), 4, 4).tolist()) == [0, 1, 5, 6]
    assert sorted(select_blocks(imp, torch.tensor(6 * 4 + 1), 4, 5).tolist()) == [0, 1, 3, 5, 6]
    # early queries: only the blocks so far, padded with -1
    assert select_blocks(imp, torch.tensor(5), 4, 4).tolist() == [0, 1, -1, -1]


def test_dispatcher_uses_gather_off_cuda_and_explains_what_triton_cannot_tile():
    q = torch.randn(1, 4, 8, 16)
    assert resolve_kernel("auto", q, 2, 16, 64) == "gather"
    assert triton_unsupported(128, 1, 64, 64, 64) == "GQA group of 128 query heads exceeds the Triton kernel's 64"
    assert "head_dim=320" in triton_unsupported(16, 1, 320, 64, 64)
    assert triton_unsupported(16, 1, 64, 64, 64) is None
    xs = inputs(1, 20, 4, 1, 8, 8, 8, 4)
    kw = dict(block=8, stride=4, select_block=8, top_n=3, window=5)
    torch.testing.assert_close(nsa_attention(*xs, **kw), nsa_reference(*xs, **kw), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel must be one of"):
        nsa_attention(*xs, **kw, kernel="chunked")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        # an explicit triton request that cannot run here falls back with a warning instead of failing
        with pytest.warns(UserWarning, match="runs the gather path instead: the Triton kernel needs CUDA"):
            o = nsa_attention(*xs, **kw, kernel="triton")
        torch.testing.assert_close(o, nsa_gather(*xs, **kw))


# ---- the compiled mixer -------------------------------------------------------------------------------

LAYER = """
model M(x: Tensor[B, T, 32]) {
    y = %s as mixer
    return y
}
"""
SMALL = dict(d_model=32, n_layers=1, n_heads=4, kv_heads=2, head_dim=8, d_ff=48, vocab=64)


@pytest.mark.parametrize("compress", ["mlp", "mean"])
def test_spec_runs_forward_backward_and_reference_kernel_gives_the_same_logits(compress):
    spec = SPECS / "nsa.arch"
    default = archc.compile(spec, SMALL)
    forced = archc.compile(spec, SMALL, kernels={"nsa": "reference"})
    assert "kernel='reference'" in forced.source and "kernel='auto'" in default.source
    if compress == "mean":
        text = spec.read_text().replace("window=window)", 'window=window, compress="mean")')
        default = archc.compile(text, SMALL, name="nsa.arch")
        forced = archc.compile(text, SMALL, name="nsa.arch", kernels={"nsa": "reference"})
        assert "compress='mean'" in default.source
    torch.manual_seed(0)
    a = default.build()
    b = forced.build()
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 64, (2, 40))  # two selection blocks: the sparse case is the next test's
    out = a(tokens)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
    with torch.no_grad():
        torch.testing.assert_close(b(tokens)["logits"], a(tokens)["logits"], rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in a.parameters()) == analysis.total_params(default.ir)


def test_sparse_layer_reference_matches_default_kernel():
    call = "nsa(x, heads=4, kv_heads=1, head_dim=8, cmp_block=8, stride=4, select_block=8, top_n=3, window=6)"
    a = archc.compile(LAYER % call, name="nsa.arch").build()
    b = archc.compile(LAYER % call, name="nsa.arch", kernels={"mixer": "reference"}).build()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 41, 32)
    torch.testing.assert_close(b(x)["y"], a(x)["y"], rtol=1e-4, atol=1e-5)


def test_kernel_choice_records_the_fallback_for_groups_triton_cannot_tile():
    call = "nsa(x, heads=%d, kv_heads=1, head_dim=8)"
    small = archc.compile(LAYER % (call % 4), name="nsa.arch")
    (node,) = [n for n in small.ir.nodes() if n.op == "nsa_core"]
    assert node.attrs["kernel"] == "auto"
    wide = archc.compile("model M(x: Tensor[B, T, 1040]) {\n y = %s as mixer\n return y\n}" % (call % 130),
                         name="nsa.arch")
    (node,) = [n for n in wide.ir.nodes() if n.op == "nsa_core"]
    assert node.attrs["kernel"] == "gather"
    assert "GQA group of 130 query heads exceeds the Triton kernel's 64" in node.attrs["kernel_reason"]
    assert "# kernel: gather — GQA group of 130" in wide.source
    with pytest.raises(archc.SpecError, match="`chunked` is not a kernel of nsa"):
        archc.compile(LAYER % (call % 4), name="nsa.arch", kernels={"nsa": "chunked"})


def test_summary_and_flops_say_how_the_branches_grow():
    compiled = archc.compile(SPECS / "nsa.arch")
    text = compiled.summary(seq=256)
    assert "4 nsa (selection and window linear in T, compression T²/stride)" in text
    assert "KV cache" in text
    # long sequences: selection (top_n · select_block = 128 keys) and window (64) are fixed per query, so
    # the mixer FLOPs grow as T (those two) plus T²/stride (compression)
    (core, *_rest) = [n for n in compiled.ir.nodes() if n.op == "nsa_core"]

    def mixer_flops(T):
        return analysis.node_cost(compiled.ir, core, analysis.sizes_for(compiled.ir, 1, T))[1]

    a = core.attrs
    per_key = 4 * a["heads"] * a["head_dim"]
    for T in (1024, 4096):
        n_cmp = compressed_blocks(T, a["cmp_block"], a["stride"])
        mlp = 2 * n_cmp * a["kv_heads"] * 2 * (a["cmp_block"] * a["head_dim"] ** 2 + a["head_dim"] ** 2)
        assert mixer_flops(T) == T * per_key * (n_cmp + 128 + 64) + mlp


def test_bad_options_are_located_errors():
    cases = {
        "nsa(x, heads=4, cmp_block=20, stride=8)": "`stride` \\(8\\) must divide `cmp_block` \\(20\\)",
        "nsa(x, heads=4, cmp_block=16, stride=8, select_block=20)": "`stride` \\(8\\) must divide `select_block`",
        "nsa(x, heads=4, top_n=2)": "`top_n` \\(2\\) must be at least 3",
        "nsa(x, heads=4, top_n=16, max_len=512)": "`top_n` \\(16\\) exceeds the 8 selection blocks",
        "nsa(x, heads=4, kv_heads=3)": "heads=4 must be a multiple of kv_heads=3",
        'nsa(x, heads=4, compress="max")': "`compress` must be one of",
        "nsa(x, heads=4, window=0)": "`window` must be positive",
        "nsa(x, heads=4, head_dim=7)": "RoPE needs an even head_dim",
    }
    for call, message in cases.items():
        with pytest.raises(archc.SpecError, match=message) as err:
            archc.compile(LAYER % call, name="bad.arch")
        assert err.value.span is not None and err.value.span.line == 3, call


def test_max_len_is_enforced_at_run_time():
    model = archc.compile(LAYER % "nsa(x, heads=4, cmp_block=8, stride=4, select_block=8, top_n=3, max_len=24)",
                          name="nsa.arch").build()
    model(torch.randn(1, 24, 32))
    with pytest.raises(ValueError, match="longer than max_len=24"):
        model(torch.randn(1, 25, 32))


@pytest.mark.parametrize("kernel", ["gather", "reference"])
@pytest.mark.parametrize("case", ["T37_group2_ragged", "T70_group4_sparse"])
def test_each_branch_alone_is_the_layer_with_one_gate_open(case, kernel):
    """nsa_branch (NSA written as gated paths): Σ_b g_b · nsa_branch(b) is nsa_attention, outputs and gradients."""
    B, T, HQ, H, K, V, block, stride, sel, n, w = CASES[case]
    xs = inputs(B, T, HQ, H, K, V, block, stride)
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win = xs
    kw = dict(block=block, stride=stride, select_block=sel, top_n=n, window=w, kernel=kernel)
    whole = nsa_attention(*xs, **kw)
    parts = (nsa.nsa_branch("cmp", q, k_cmp, v_cmp, **kw), nsa.nsa_branch("slc", q, k_slc, v_slc, k_cmp=k_cmp, **kw),
             nsa.nsa_branch("win", q, k_win, v_win, **kw))
    summed = sum(g[..., None] * part for g, part in zip((g_cmp, g_slc, g_win), parts))
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-6)
    do = torch.randn_like(whole)
    for name, a, b in zip(NAMES, torch.autograd.grad((summed * do).sum(), xs),
                          torch.autograd.grad((whole * do).sum(), xs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
