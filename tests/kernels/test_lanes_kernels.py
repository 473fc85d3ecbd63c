"""Residual-lane mixing kernels (archc.kernels.lanes) against their plain references.

- Sinkhorn–Knopp: doubly stochastic to 1e-6 after 20 iterations (rows exactly
  after the last row step; columns for logits N(0, 0.5²)), column error
  falling with iterations, torch.autograd.gradcheck in float64 on the reference and on
  the torch face's hand-written backward.
- lanes_pre / lanes_post, the torch face and the Triton face against the
  reference: forward outputs (u, post, res, h') and the gradient of every
  input (h, logits, y), with upstream gradients on all four outputs so every
  backward path is exercised. Shapes: n = 1, 2, 3, 4, 8; one token; channel
  counts that are not a multiple of the 16-wide interpreter tile; logits
  shared by all tokens (hc_static's); bf16 storage once.
- lanes_pre_projected (mHC's read with its logit projection in the same
  Function) against autograd through projected_logits_reference +
  lanes_pre_reference: every output and the gradients of h, the projection,
  the scales and the bias; gradcheck; and the read's and the write's
  gradients of a lane state summed in place (no extra [N, n, d] allocation).
- The Triton face runs under TRITON_INTERPRET=1 in one subprocess (the
  variable must be set before triton is imported and must not leak into
  other test modules), which prints JSON the tests assert on; and every
  kernel is compiled for an H100 (sm_90) without a GPU, so code only the
  interpreter accepts still fails here.

Bounds are relative L2 errors against a float64 reference on the same
(rounded) inputs: 1e-5 for fp32 (observed ~1e-7), 2e-2 for bf16 outputs.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import interpreted_results

from archc.kernels import lanes as L

ROOT = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-5
BF16_TOL = 2e-2

# name: (leading dims, n, d, act, iters, dtype, shared logits)
CASES = {
    "n4_B2T7_d37_mhc": ((2, 7), 4, 37, "mhc", 20, "float32", False),
    "n1_T5_mhc": ((5,), 1, 8, "mhc", 20, "float32", False),
    "n4_T1_mhc": ((1, 1), 4, 16, "mhc", 20, "float32", False),
    "n3_T6_d19_identity": ((6,), 3, 19, "identity", 20, "float32", False),
    "n2_T9_iters1": ((9,), 2, 16, "mhc", 1, "float32", False),
    "n8_T5_d20_mhc": ((5,), 8, 20, "mhc", 20, "float32", False),
    "n4_T6_shared_identity": ((2, 3), 4, 24, "identity", 20, "float32", True),
    "n4_T5_bf16_mhc": ((5,), 4, 32, "mhc", 20, "bfloat16", False),
}
OUTPUTS = ("u", "post", "res", "out")
INPUTS = ("h", "logits", "y")


def make_case(lead, n, d, act, iters, dtype, shared, device="cpu"):
    g = torch.Generator().manual_seed(n * 100 + d + iters)
    dtype = getattr(torch, dtype)
    h = torch.randn(*lead, n, d, generator=g).to(dtype)
    logits = torch.randn(*(() if shared else lead), L.coefficient_count(n), generator=g)
    y = torch.randn(*lead, d, generator=g).to(dtype)
    grads = [torch.randn(*lead, d, generator=g), torch.randn(*lead, n, generator=g),
             torch.randn(*lead, n, n, generator=g), torch.randn(*lead, n, d, generator=g)]
    return [t.to(device) for t in (h, logits, y)], [t.to(device) for t in grads]


def run_face(impl, inputs, grads, act, iters, dtype=None):
    """Outputs (u, post, res, h') and the gradients of (h, logits, y) under `impl`."""
    leaves = [(x if dtype is None else x.to(dtype)).detach().clone().requires_grad_() for x in inputs]
    h, logits, y = leaves
    u, post, res = L.lanes_pre(h, logits, act=act, iters=iters, impl=impl)
    out = L.lanes_post(h, y, post, res, impl=impl)
    outs = (u, post, res, out)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sum((o.to(acc) * g.to(o.device, acc)).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach() for o in outs], [x.grad for x in leaves]


def relative_errors(case, impl, device="cpu"):
    act, iters = CASES[case][3:5]
    inputs, grads = make_case(*CASES[case], device=device)
    outs, dins = run_face(impl, inputs, grads, act, iters)
    ref_outs, ref_dins = run_face("reference", [x.cpu() for x in inputs], [g.cpu() for g in grads], act, iters,
                                  dtype=torch.float64)
    errors = {"dtype_ok": outs[0].dtype == inputs[0].dtype and outs[3].dtype == inputs[0].dtype}
    for name, a, b in zip(OUTPUTS + INPUTS, outs + dins, ref_outs + ref_dins):
        a = a.cpu().double()
        errors[name] = ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if torch.isfinite(a).all() else 1e30
    return errors


def tolerance(case) -> float:
    return FP32_TOL if CASES[case][5] == "float32" else BF16_TOL


# ----------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_is_doubly_stochastic(impl, n, dtype):
    # Logits of the scale mHC produces (α = 0.01 times a normalised projection, plus a bias); for
    # N(0, 1) logits 20 iterations leave column errors up to ~1e-2 at n = 2 (measured over 10^4
    # draws): finite Sinkhorn is approximate, which the convergence test below pins down.
    logits = 0.5 * torch.randn(64, n, n, generator=torch.Generator().manual_seed(n), dtype=dtype)
    m = L.sinkhorn(logits, 20, impl=impl)
    assert m.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (m >= 0).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-6  # the last step normalised the rows
    assert (m.sum(-2) - 1).abs().max() < 1e-6


def test_sinkhorn_column_error_falls_with_iterations():
    logits = 2.0 * torch.randn(32, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = [(L.sinkhorn(logits, k).sum(-2) - 1).abs().max().item() for k in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-8  # logits 4x wider than mHC's need more than 20 iterations (~1e-2 there)


def test_sinkhorn_faces_agree_and_ignore_column_scaling():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 5, 5, generator=g, dtype=torch.float64)
    ref = L.sinkhorn_reference(logits, 7)
    torch.testing.assert_close(L.sinkhorn(logits, 7, impl="torch"), ref, rtol=1e-12, atol=1e-14)
    shifted = logits + torch.randn(10, 1, 5, generator=g, dtype=torch.float64)  # exp: a factor per column
    torch.testing.assert_close(L.sinkhorn_reference(shifted, 7), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_sinkhorn_gradcheck(impl):
    logits = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: L.sinkhorn(z, 20, impl=impl), (logits.requires_grad_(),))


@pytest.mark.parametrize("act", ["mhc", "identity"])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_lanes_gradcheck(act, impl):
    g = torch.Generator().manual_seed(2)
    n, d = 3, 5
    h = torch.randn(2, 2, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 2, L.coefficient_count(n), generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, d, generator=g, dtype=torch.float64, requires_grad=True)

    def f(h, logits, y):
        u, post, res = L.lanes_pre(h, logits, act=act, iters=6, impl=impl)
        return u, post, res, L.lanes_post(h, y, post, res, impl=impl)

    assert torch.autograd.gradcheck(f, (h, logits, y))


# ----------------------------------------------------------------------------- torch face


@pytest.mark.parametrize("case", list(CASES))
def test_torch_face_matches_reference(case):
    errors = relative_errors(case, "torch")
    assert errors.pop("dtype_ok")
    for name, err in errors.items():
        assert err < tolerance(case), (name, errors)


def test_torch_face_saves_no_sinkhorn_iterates():
    """The fused Functions keep h and the logits (pre), h, y and the coefficients (post); nothing else."""
    n, d = 4, 32
    h = torch.randn(8, n, d, requires_grad=True)
    logits = torch.randn(8, L.coefficient_count(n), requires_grad=True)
    y = torch.randn(8, d, requires_grad=True)

    def saved_bytes(impl):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _u, post, res = L.lanes_pre(h, logits, impl=impl)
            L.lanes_post(h, y, post, res, impl=impl)
        return sum(seen.values())

    inputs = sum(t.untyped_storage().nbytes() for t in (h, logits, y))
    coefficients = 8 * (n + n * n) * 4
    assert saved_bytes("torch") == inputs + coefficients
    assert saved_bytes("reference") > 2 * (inputs + coefficients)  # every Sinkhorn iterate


# name: (leading dims, n, d, iters, dtype)
PROJECTED_CASES = {
    "n4_B2T7_d37": ((2, 7), 4, 37, 20, "float32"),
    "n2_T1_d16": ((1,), 2, 16, 20, "float32"),
    "n3_T6_d19_iters3": ((6,), 3, 19, 3, "float32"),
    "n4_T5_bf16": ((5,), 4, 32, 20, "bfloat16"),
}


def run_projected(impl, h, weight, scale, bias, grads, iters, dtype=None):
    """(u, post, res) of lanes_pre_projected and the gradients of (h, weight, scale, bias) under `impl`."""
    leaves = [(x if dtype is None else x.to(dtype)).detach().clone().requires_grad_() for x in (h, weight, scale, bias)]
    outs = L.lanes_pre_projected(*leaves, norm_eps=1e-6, iters=iters, impl=impl)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sum((o.to(acc) * g.to(acc)).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach() for o in outs], [x.grad for x in leaves]


@pytest.mark.parametrize("case", list(PROJECTED_CASES))
def test_projected_read_matches_reference(case):
    """The torch face's one-Function read (projection, RMS, coefficients, Sinkhorn, u) against autograd through
    projected_logits_reference + lanes_pre_reference in float64: every output and the gradient of h, the
    projection weight, the scales and the bias."""
    lead, n, d, iters, dtype = PROJECTED_CASES[case]
    g = torch.Generator().manual_seed(n * 10 + d)
    C = L.coefficient_count(n)
    h = torch.randn(*lead, n, d, generator=g).to(getattr(torch, dtype))
    weight = 0.05 * torch.randn(n * d, C, generator=g)
    scale, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    grads = [torch.randn(*lead, d, generator=g), torch.randn(*lead, n, generator=g),
             torch.randn(*lead, n, n, generator=g)]
    outs, dins = run_projected("torch", h, weight, scale, bias, grads, iters)
    ref_outs, ref_dins = run_projected("reference", h, weight, scale, bias, grads, iters, dtype=torch.float64)
    tol = FP32_TOL if dtype == "float32" else BF16_TOL
    assert outs[0].dtype == h.dtype
    for name, a, b in zip(("u", "post", "res", "h", "weight", "scale", "bias"), outs + dins, ref_outs + ref_dins):
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < tol, (name, err)


def test_projected_read_gradcheck():
    g = torch.Generator().manual_seed(4)
    n, d = 3, 4
    C = L.coefficient_count(n)
    f64 = {"generator": g, "dtype": torch.float64}
    args = (torch.randn(2, n, d, **f64), 0.3 * torch.randn(n * d, C, **f64), torch.rand(C, **f64) + 0.5,
            torch.randn(C, **f64))
    assert torch.autograd.gradcheck(lambda *a: L.lanes_pre_projected(*a, iters=5, impl="torch"),
                                    tuple(a.requires_grad_() for a in args))


@pytest.mark.parametrize("projected", [False, True])
def test_lane_gradients_are_summed_in_place(projected):
    """The read and the write both take the lane state h; their Functions return a fresh, non-view gradient of
    h's own shape, so autograd adds one into the other (aten::add_) instead of allocating the sum (aten::add),
    and the new lane state is no view either."""
    n, d = 4, 16
    g = torch.Generator().manual_seed(5)
    leaf = torch.randn(2, 3, n, d, generator=g, requires_grad=True)
    C = L.coefficient_count(n)
    weight, scale, bias = 0.1 * torch.randn(n * d, C, generator=g), torch.ones(C), torch.zeros(C)
    h = leaf * 1.0  # not a leaf: its gradient is summed in the autograd engine's buffer
    if projected:
        u, post, res = L.lanes_pre_projected(h, weight, scale, bias, impl="torch")
    else:
        u, post, res = L.lanes_pre(h, torch.randn(2, 3, C, generator=g), impl="torch")
    out = L.lanes_post(h, u * 2.0, post, res, impl="torch")
    assert out._base is None and out.shape == h.shape
    with torch.profiler.profile() as prof:
        out.backward(torch.randn(out.shape, generator=g))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::add_", 0) >= 1 and counts.get("aten::add", 0) == 0, counts


def test_bad_arguments_are_named():
    h, logits = torch.randn(2, 4, 8), torch.randn(2, 24)
    with pytest.raises(ValueError, match="iters"):
        L.lanes_pre(h, logits, iters=0)
    with pytest.raises(ValueError, match="act"):
        L.lanes_pre(h, logits, act="softmax")
    with pytest.raises(ValueError, match="24 coefficient logits"):
        L.lanes_pre(h, torch.randn(2, 20))
    with pytest.raises(ValueError, match="impl"):
        L.lanes_pre(h, logits, impl="cuda")
    with pytest.raises(ValueError, match=r"weight \[32, 24\]"):
        L.lanes_pre_projected(h, torch.randn(8, 24), torch.randn(24), torch.randn(24))
    with pytest.raises(ValueError, match="y"):
        L.lanes_post(h, torch.randn(2, 7), torch.randn(2, 4), torch.randn(2, 4, 4))
    if os.environ.get("TRITON_INTERPRET") != "1" and L.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            L.lanes_pre(h, logits, impl="triton")


# ----------------------------------------------------------------------------- Triton face (child process)


def _child_main():
    import time

    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)  # tiny ops: a second thread only waits on the other jobs of a busy machine
    results = {}
    for case in CASES:
        start = time.perf_counter()
        results[case] = relative_errors(case, "triton")
        print(f"{case}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child_main()
    sys.exit(0)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


@functools.cache
def _triton_results():
    return interpreted_results(__file__, timeout=900)


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_face_matches_reference(case):
    errors = dict(_triton_results()[case])
    assert errors.pop("dtype_ok"), errors
    for name, err in errors.items():
        assert err < tolerance(case), (name, errors)


@needs_triton
def test_interpreter_env_stays_in_the_child():
    _triton_results()
    assert os.environ.get("TRITON_INTERPRET") == _ENV_AT_IMPORT


@needs_triton
def test_kernels_compile_for_sm90():
    """Compile (not run) the four kernels for an H100 in bf16, with unit channel strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from archc.kernels import _triton_lanes as K

    def build(fn, sig: dict, consts: dict):
        names = list(sig)
        sig = {k: ("constexpr" if k in consts else v) for k, v in sig.items()}
        src = ASTSource(fn, sig, {(names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 1, "enable_fp_fusion": True})

    def ints(*names):
        return {k: "i32" for k in names}

    shape = {"LANES": 4, "NP": 4, "BLOCK_T": 16, "BLOCK_D": 128}
    pre = dict(MHC=True, **shape)
    built = [
        build(K._lanes_pre_fwd,
              dict(h_ptr="*bf16", l_ptr="*fp32", u_ptr="*bf16", post_ptr="*fp32", res_ptr="*fp32",
                   **ints("N", "D", "iters", "s_hn", "s_hl", "s_hd", "s_ln", "s_lc", "s_un", "s_ud"),
                   **dict.fromkeys(pre, "constexpr")),
              dict(pre, s_hd=1, s_lc=1, s_ud=1)),
        build(K._lanes_pre_bwd,
              dict(h_ptr="*bf16", l_ptr="*fp32", du_ptr="*bf16", dpost_ptr="*fp32", dres_ptr="*fp32",
                   dh_ptr="*bf16", dl_ptr="*fp32",
                   **ints("N", "D", "iters", "s_hn", "s_hl", "s_hd", "s_ln", "s_lc", "s_dun", "s_dud", "s_dhn",
                          "s_dhl", "s_dhd"),
                   **dict.fromkeys(pre, "constexpr"), ITP="constexpr"),
              dict(pre, ITP=32, s_hd=1, s_lc=1, s_dud=1, s_dhd=1)),
        build(K._lanes_post_fwd,
              dict(h_ptr="*bf16", y_ptr="*bf16", post_ptr="*fp32", res_ptr="*fp32", o_ptr="*bf16",
                   **ints("N", "D", "s_hn", "s_hl", "s_hd", "s_yn", "s_yd", "s_on", "s_ol", "s_od"),
                   **dict.fromkeys(shape, "constexpr")),
              dict(shape, s_hd=1, s_yd=1, s_od=1)),
        build(K._lanes_post_bwd,
              dict(h_ptr="*bf16", y_ptr="*bf16", post_ptr="*fp32", res_ptr="*fp32", g_ptr="*bf16", dh_ptr="*bf16",
                   dy_ptr="*bf16", dpost_ptr="*fp32", dres_ptr="*fp32",
                   **ints("N", "D", "s_hn", "s_hl", "s_hd", "s_yn", "s_yd", "s_gn", "s_gl", "s_gd", "s_dhn", "s_dhl",
                          "s_dhd", "s_dyn", "s_dyd"),
                   **dict.fromkeys(shape, "constexpr")),
              dict(shape, s_hd=1, s_yd=1, s_gd=1, s_dhd=1, s_dyd=1)),
    ]
    for c in built:
        assert c.metadata.shared <= 228 * 1024
        assert "st.global" in c.asm["ptx"]
