"""Grouped GEMM faces and MoE token permutation (archc.kernels.grouped_gemm).

Every face is checked forward and backward (dX, dW through autograd) against
the reference loop run in float64 on the same (rounded) inputs.  Tolerances:
fp32 rtol 1e-5 / atol 1e-4 (K <= 48: accumulation-order noise is ~1e-6);
bf16 rtol 1.6e-2 / atol 1e-2 (one bf16 rounding of an fp32-accumulated
result is <= 2**-9 relative).  The Triton face runs in
tests/kernels/test_grouped_gemm_triton.py (interpreter subprocess / CUDA); the cases
and helpers below are shared with it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archc.kernels import grouped_gemm as gg
from archc.kernels.grouped_gemm import combine, dispatch, gather_sorted, grouped_mm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}

# name -> (N, K, M, counts); N <= 40, K, M <= 48, E <= 5 so the Triton
# interpreter stays quick.  K / M include values that are not multiples of the
# Triton block (16 under the interpreter) nor of _grouped_mm's 16-byte rows.
CASES = {
    "ragged_with_empty": (23, 20, 24, [5, 0, 17, 1]),
    "one_token": (1, 12, 16, [0, 1, 0]),
    "all_in_one_expert": (33, 48, 40, [0, 0, 33]),
    "n_zero": (0, 8, 12, [0, 0, 0]),
    "odd_dims": (7, 5, 3, [2, 0, 5]),
    "multi_tile_5_experts": (40, 36, 44, [9, 0, 16, 1, 14]),
    "single_expert": (10, 16, 16, [10]),
}


def make_inputs(case: str, dtype: torch.dtype, device="cpu", seed: int = 0):
    n, k, m, counts = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = torch.randn(len(counts), k, m, generator=g).to(dtype)
    dy = torch.randn(n, m, generator=g).to(dtype)
    return x.to(device), w.to(device), torch.tensor(counts, device=device), dy.to(device)


def run_face(fn, x, w, counts, dy):
    """(y, dx, dw) of fn, with autograd for the gradients."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, counts)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def truth(x, w, counts, dy):
    """The reference loop in float64 on the same inputs, returned in float64."""
    return run_face(gg.grouped_mm_reference, x.double(), w.double(), counts, dy.double())


def assert_face_matches(fn, x, w, counts, dy, what=""):
    got = run_face(fn, x, w, counts, dy)
    want = truth(x.cpu(), w.cpu(), counts.cpu(), dy.cpu())
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == x.dtype and a.shape == b.shape, (what, name, a.dtype, a.shape, b.shape)
        torch.testing.assert_close(a.cpu().double(), b, **TOL[x.dtype], msg=lambda m: f"{what} {name}: {m}")
    return got


FACES = {"reference": gg.grouped_mm_reference, "torch": gg.grouped_mm_torch}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("face", list(FACES))
def test_face_matches_float64_truth(face, case, dtype):
    x, w, counts, dy = make_inputs(case, DTYPES[dtype])
    _, _, dw = assert_face_matches(FACES[face], x, w, counts, dy, f"{face}/{case}/{dtype}")
    assert (dw[torch.tensor(CASES[case][3]) == 0] == 0).all()  # empty experts get exact zeros


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["ragged_with_empty", "odd_dims"])
def test_reference_and_torch_faces_agree(case, dtype):
    x, w, counts, dy = make_inputs(case, DTYPES[dtype], seed=1)
    ref = run_face(gg.grouped_mm_reference, x, w, counts, dy)
    fast = run_face(gg.grouped_mm_torch, x, w, counts, dy)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, **TOL[DTYPES[dtype]])


@pytest.mark.parametrize("face", list(FACES))
def test_zero_stride_upstream_grad(face):
    # y.sum().backward() hands the op an expanded (all-zero-stride) gradient.
    x, w, counts, _ = make_inputs("ragged_with_empty", torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    FACES[face](x, w, counts).sum().backward()
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    gg.grouped_mm_reference(xd, wd, counts).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, **TOL[torch.float32])
    torch.testing.assert_close(w.grad.double(), wd.grad, **TOL[torch.float32])


@pytest.mark.parametrize("face", list(FACES))
def test_strided_inputs(face):
    # w as a transposed view of an nn.Linear-style [E, M, K] weight, x a column slice.
    g = torch.Generator().manual_seed(3)
    w_emk = torch.randn(3, 24, 16, generator=g)
    x_wide = torch.randn(12, 20, generator=g)
    x, w = x_wide[:, :16], w_emk.transpose(1, 2)
    counts = torch.tensor([4, 0, 8])
    dy = torch.randn(12, 24, generator=g)
    assert_face_matches(FACES[face], x, w, counts, dy, face)


def test_float64_falls_back_to_reference():
    x, w, counts, dy = make_inputs("ragged_with_empty", torch.float64)
    assert gg._auto_impl(x) == "reference"
    torch.testing.assert_close(gg.grouped_mm_torch(x, w, counts), gg.grouped_mm_reference(x, w, counts))


def test_raw_torch_grouped_mm_quirks_that_the_wrapper_handles():
    """Pinned facts about torch._grouped_mm on CPU (torch 2.13); if one stops
    holding, the matching workaround in grouped_mm_torch may be dropped."""
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 8, 8, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int32"):
        torch._grouped_mm(x, w, offs=offs.long())
    with pytest.raises(RuntimeError, match="16 bytes"):
        torch._grouped_mm(torch.randn(10, 5), torch.randn(3, 5, 8), offs=offs)
    with pytest.raises(RuntimeError, match="Invalid strides"):
        torch._grouped_mm(x, w, offs=offs).sum().backward()
    with pytest.raises(RuntimeError):
        torch._grouped_mm(x.double(), w.double(), offs=offs)


def test_dispatcher_choices():
    x32 = torch.randn(4, 8)
    assert gg._auto_impl(x32) == "torch"
    assert gg._auto_impl(x32.bfloat16()) == "torch"
    assert gg._auto_impl(x32.double()) == "reference"
    x, w, counts, _ = make_inputs("ragged_with_empty", torch.float32)
    want = gg.grouped_mm_reference(x, w, counts)
    for impl in ("auto", "reference", "torch"):
        torch.testing.assert_close(grouped_mm(x, w, counts, impl=impl), want, **TOL[torch.float32])
    with pytest.raises(ValueError, match="unknown impl"):
        grouped_mm(x, w, counts, impl="cutlass")


@pytest.mark.skipif(not gg.triton_available(), reason="triton not installed")
def test_triton_face_on_cpu_needs_the_interpreter():
    if gg._triton_interpreted():
        pytest.skip("this process runs Triton interpreted")
    x, w, counts, _ = make_inputs("one_token", torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        grouped_mm(x, w, counts, impl="triton")


def test_input_validation():
    x, w, counts, _ = make_inputs("ragged_with_empty", torch.float32)
    with pytest.raises(ValueError, match="sum to"):
        grouped_mm(x, w, counts + 1)
    with pytest.raises(ValueError, match="non-negative"):
        grouped_mm(x, w, torch.tensor([6, -1, 17, 1]))
    with pytest.raises(TypeError, match="share a dtype"):
        grouped_mm(x, w.double(), counts)
    with pytest.raises(ValueError, match="counts must be"):
        grouped_mm(x, w, counts[:3])
    with pytest.raises(TypeError, match="integers"):
        grouped_mm(x, w, counts.float())


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    k=st.integers(1, 12),
    m=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_torch_face_property(counts, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x, w = torch.randn(n, k, generator=g), torch.randn(len(counts), k, m, generator=g)
    dy = torch.randn(n, m, generator=g)
    assert_face_matches(gg.grouped_mm_torch, x, w, torch.tensor(counts), dy, f"{counts} k={k} m={m}")


# --------------------------------------------------------------------------- MoE permutation


def reference_moe_loop(x, w, expert_idx, weights):
    """Per-token loop: out[t] = sum_j weights[t, j] * (x[t] @ w[expert_idx[t, j]])."""
    n, k = expert_idx.shape
    rows = []
    for t in range(n):
        acc = x.new_zeros(w.shape[2])
        for j in range(k):
            acc = acc + weights[t, j] * (x[t] @ w[expert_idx[t, j]])
        rows.append(acc)
    if not rows:  # keep the graph so that N == 0 still yields (zero) gradients
        return x.new_zeros((0, w.shape[2])) + 0 * (x.sum() + w.sum() + weights.sum())
    return torch.stack(rows)


def moe_grouped(x, w, expert_idx, weights, impl):
    n, k = expert_idx.shape
    order, counts, inverse = dispatch(expert_idx, num_experts=w.shape[0])
    y_sorted = grouped_mm(gather_sorted(x, order, k), w, counts, impl=impl)
    return combine(y_sorted, order, weights, n, inverse=inverse)


def test_dispatch_is_a_stable_sort_by_expert():
    expert_idx = torch.tensor([[2, 0], [0, 2], [1, 0], [2, 1], [0, 0]])
    order, counts, inverse = dispatch(expert_idx, num_experts=4)
    flat = expert_idx.reshape(-1)
    assert counts.tolist() == [5, 2, 3, 0]
    assert flat[order].tolist() == sorted(flat.tolist())
    # ties keep (token, slot) order: within an expert the flat indices increase
    for e in range(4):
        idx = order[flat[order] == e]
        assert idx.tolist() == sorted(idx.tolist())
    assert torch.equal(inverse.reshape(-1)[order], torch.arange(flat.numel()))
    assert inverse.shape == expert_idx.shape
    # without num_experts, E = max + 1
    assert dispatch(expert_idx)[1].tolist() == [5, 2, 3]


def test_dispatch_empty():
    order, counts, inverse = dispatch(torch.zeros((0, 2), dtype=torch.long), num_experts=3)
    assert order.numel() == 0 and counts.tolist() == [0, 0, 0] and inverse.shape == (0, 2)


def test_combine_matches_per_token_loop_and_is_differentiable():
    g = torch.Generator().manual_seed(5)
    n, k, m = 6, 2, 4
    expert_idx = torch.randint(0, 3, (n, k), generator=g)
    order, _, _ = dispatch(expert_idx, num_experts=3)
    y_sorted = torch.randn(n * k, m, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    out = combine(y_sorted, order, weights, n)
    want = torch.stack([sum(weights[t, j] * y_sorted[(order == t * k + j).nonzero()[0, 0]] for j in range(k))
                        for t in range(n)])
    torch.testing.assert_close(out, want)
    assert torch.autograd.gradcheck(lambda y, wt: combine(y, order, wt, n), (y_sorted, weights))


def test_gather_sorted_rows():
    x = torch.arange(12.0).view(4, 3)
    expert_idx = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    order, _, _ = dispatch(expert_idx, num_experts=2)
    got = gather_sorted(x, order, 2)
    assert torch.equal(got, x[torch.tensor([0, 1, 3, 3, 0, 1, 2, 2])])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("n,k,e", [(9, 2, 4), (5, 1, 3), (0, 2, 3), (7, 3, 5)])
def test_moe_pipeline_matches_per_token_loop(n, k, e, impl, dtype):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(n * 100 + k * 10 + e)
    d, f = 12, 20
    x = torch.randn(n, d, generator=g).to(dt)
    w = torch.randn(e, d, f, generator=g).to(dt)
    scores = torch.rand(n, e, generator=g)
    weights, expert_idx = scores.topk(k, dim=-1)  # fp32 gates, as torchtitan
    expert_idx[: n // 2, 0] = 0  # crowd expert 0
    dout = torch.randn(n, f, generator=g).to(dt)

    def grads(fn, x, w, weights):
        x, w, weights = (t.detach().clone().requires_grad_(True) for t in (x, w, weights))
        out = fn(x, w, expert_idx, weights)
        out.backward(dout.to(out.dtype))
        return out.detach(), x.grad, w.grad, weights.grad

    got = grads(lambda *a: moe_grouped(*a, impl=impl), x, w, weights)
    want = grads(reference_moe_loop, x.double(), w.double(), weights.double())
    # bf16 rounds twice on the way (expert outputs, then the combined rows), so
    # its absolute tolerance scales with each tensor's magnitude.
    for name, a, b in zip(("out", "dx", "dw", "dweights"), got, want):
        tol = dict(TOL[dt])
        if dt == torch.bfloat16 and b.numel():
            tol["atol"] = 1e-2 * float(b.abs().max())
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda msg: f"{name}: {msg}")
