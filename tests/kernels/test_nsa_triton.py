"""The Triton selection kernel of NSA against plain references, under the Triton interpreter.

As in test_delta_rule_triton.py: TRITON_INTERPRET must be set before triton is imported and must not
leak into other test modules, so every case runs in one subprocess (`python tests/kernels/test_nsa_triton.py`
with the variable in the child's environment only), which prints JSON; the tests assert on it.

Checked per case: the kernel's selection output and log-sum-exp against attention over an explicit
mask of the selected blocks' tokens (s <= t); the whole layer (`nsa_triton`) against the per-query
reference, outputs and gradients of every input (the backward recomputes the selection branch with
the gather path). Shapes are tiny: B = 1, T <= 21 (ragged against the blocks), GQA groups 1, 2, 4 and 20
(a group wider than one 16-row tile), head dims 8, 24 (padded to a tile) and 32, bf16 once.
Bounds are relative L2 errors: 1e-5 fp32 (observed ~1e-7), 2e-2 bf16 (the inputs' rounding).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import interpreted_results

FP32_TOL = 1e-5
BF16_TOL = 2e-2
ROOT = Path(__file__).resolve().parents[2]

# name: (B, T, HQ, H, K, V, block, stride, select_block, top_n, window, dtype)
CASES = {
    "T1": (1, 1, 2, 2, 8, 8, 8, 4, 16, 3, 4, "float32"),
    "T21_group2_ragged": (1, 21, 4, 2, 16, 8, 8, 4, 4, 3, 5, "float32"),
    "T18_group1_K24": (1, 18, 1, 1, 24, 16, 8, 4, 4, 3, 7, "float32"),
    "T17_group4": (1, 17, 4, 1, 32, 32, 8, 8, 8, 3, 9, "float32"),
    "T12_group20": (1, 12, 20, 1, 8, 8, 8, 4, 4, 3, 6, "float32"),
    "T14_bf16": (1, 14, 4, 1, 16, 16, 8, 4, 4, 3, 6, "bfloat16"),
}
NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win")


# ----------------------------------------------------------------------------- child process


def _run_case(B, T, HQ, H, K, V, block, stride, sel, n, w, dtype):
    import torch

    from archc.kernels._triton_nsa import selection_forward
    from archc.kernels.nsa import compressed_blocks, nsa_reference, nsa_triton

    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(T * 13 + HQ)
    Nc = compressed_blocks(T, block, stride)
    shapes = [(B, T, HQ, K), (B, Nc, H, K), (B, Nc, H, V), (B, T, H, K), (B, T, H, V), (B, T, H, K), (B, T, H, V)]
    xs = [torch.randn(*s, generator=gen).to(dtype) for s in shapes]
    xs += [torch.rand(B, T, HQ, generator=gen).to(dtype) for _ in range(3)]
    kw = dict(block=block, stride=stride, select_block=sel, top_n=n, window=w)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    # the kernel alone, on the reference's blocks, against an explicit mask of the selected tokens
    _o, idx = nsa_reference(*xs, **kw, return_block_indices=True)
    q, k, v = xs[0], xs[3], xs[4]
    o_k, lse_k = selection_forward(q, k, v, idx, sel, K ** -0.5)
    G = HQ // H
    pos = torch.arange(T)
    in_block = (idx[..., None] == (pos // sel)).any(-2)  # [B, T, H, T]: token s is in a selected block
    mask = (in_block & (pos <= pos[:, None])[None, :, None]).repeat_interleave(G, dim=2)
    scores = torch.einsum("bthk,bshk->bths", q.float(), k.float().repeat_interleave(G, dim=2)) * K ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    o_m = torch.einsum("bths,bshv->bthv", scores.softmax(-1), v.float().repeat_interleave(G, dim=2))
    out = {"sel_o": rel(o_k, o_m), "sel_lse": rel(lse_k, scores.logsumexp(-1))}

    # the layer, forward and backward, against the reference in fp32 on the same (rounded) values
    do = torch.randn(B, T, HQ, V, generator=gen)

    def run(face, inputs):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        o = face(*leaves, **kw)
        (o.float() * do).sum().backward()
        return o.detach(), [x.grad for x in leaves]

    o_ref, g_ref = run(nsa_reference, [x.float() for x in xs])
    o, grads = run(nsa_triton, xs)
    out["o"], out["o_dtype_ok"] = rel(o, o_ref), o.dtype == dtype
    for name, a, b in zip(NAMES, grads, g_ref):
        if b.numel() and b.norm() > 0:
            out["d" + name] = rel(a, b) if torch.isfinite(a).all() else float("inf")
    return out


def _child_main():
    import time

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)  # tiny ops: a second thread only waits on the other jobs of a busy machine
    results = {}
    for name, args in CASES.items():
        start = time.perf_counter()
        results[name] = _run_case(*args)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child_main()
    sys.exit(0)


# ----------------------------------------------------------------------------- tests

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@functools.cache
def _results():
    return interpreted_results(__file__, timeout=600)


_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


def test_interpreter_env_stays_in_the_child():
    _results()
    assert os.environ.get("TRITON_INTERPRET") == _ENV_AT_IMPORT


@pytest.mark.parametrize("case", list(CASES))
def test_triton_selection_kernel_and_layer_match_reference(case):
    res = _results()[case]
    tol = FP32_TOL if CASES[case][-1] == "float32" else BF16_TOL
    assert res["o_dtype_ok"], res
    for key in ("sel_o", "sel_lse", "o"):
        assert res[key] < tol, (key, res)
    grads = [key for key in res if key.startswith("d")]
    if CASES[case][1] > 1:  # one token: every softmax is over that token alone, dq = dk = 0
        assert {"dq", "dk_slc", "dv_slc", "dg_slc"} <= set(grads), res
    for key in grads:
        assert res[key] < tol, (key, res)
