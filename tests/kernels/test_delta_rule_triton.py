"""Triton delta-rule kernels (forward and backward) against the fp32 recurrent reference.

The kernels run on the CPU through Triton's interpreter. TRITON_INTERPRET must be set before
triton is first imported and must not leak into other test modules, so every check runs in
one subprocess: pytest starts `python tests/kernels/test_delta_rule_triton.py` with the variable set
in the child's environment only; the child runs all cases and prints JSON; the tests below
assert on those numbers. This module imports neither triton nor the kernel module itself.

Shapes are tiny (B=1, T <= 40, H <= 2, D = 16/32; interpreted kernels take seconds).
Bounds are relative L2 errors ||a - b|| / ||b||: 1e-5 for fp32 (observed ~1e-7), 1e-2 for
bf16 inputs against the fp32 reference on the same rounded values (the kernels compute in
fp32; the error is bf16 rounding of o and of the gradients). The steep partial-chunk cases
(g = -50 or -100 per token, T = 1, C + 1, 20 with C = 16) check dg as max |error| <= 1e-6 * max |dk|.
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
BF16_TOL = 1e-2
ROOT = Path(__file__).resolve().parents[2]

# name: (per_head, T, chunk, H, K, V, initial_state, output_final_state, dtype, g_min[, g_const])
# g = logsigmoid(randn) clamped to g_min, or g_const for every token when given.
CASES = {
    "kda_T40_c16_init": (False, 40, 16, 2, 16, 16, True, True, "float32", -5.0),
    "kda_T33_c32_K32_V16_noinit_nofinal": (False, 33, 32, 1, 32, 16, False, False, "float32", -5.0),
    "gdn_T40_c16_K32_init": (True, 40, 16, 2, 32, 32, True, True, "float32", -5.0),
    "gdn_T20_c64_K16_V32_noinit": (True, 20, 64, 1, 16, 32, False, True, "float32", -5.0),
    "kda_T32_c16_bf16_init": (False, 32, 16, 1, 16, 16, True, True, "bfloat16", -5.0),
    "kda_T32_c32_strong_decay": (False, 32, 32, 1, 16, 16, True, True, "float32", -100.0),
    # Partial last chunks decaying -50 nats per token (issue 17): padded rows past T must not overflow exp.
    "gdn_T20_c16_steep_partial": (True, 20, 16, 1, 16, 16, True, True, "float32", -5.0, -50.0),
    "kda_T20_c16_steep_partial": (False, 20, 16, 1, 16, 16, True, True, "float32", -5.0, -50.0),
    "gdn_T17_c16_steep_partial": (True, 17, 16, 1, 16, 16, True, True, "float32", -5.0, -100.0),
    "kda_T17_c16_steep_partial": (False, 17, 16, 1, 16, 16, True, True, "float32", -5.0, -100.0),
    "gdn_T1_c16_steep": (True, 1, 16, 1, 16, 16, True, True, "float32", -5.0, -100.0),
    "kda_T1_c16_steep": (False, 1, 16, 1, 16, 16, True, True, "float32", -5.0, -100.0),
}
# Under steep decay dg's true size is ~exp(g), far below the rounding of the terms it is summed from
# (as in test_delta_rule.py's very-strong-decay test): its error is bounded by DG_VS_DK_TOL * max |dk|.
DG_VS_DK_TOL = 1e-6
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


# ----------------------------------------------------------------------------- child process


def _run_case(per_head, T, C, H, K, V, init, final, dtype, g_min, g_const=None):
    import torch
    import torch.nn.functional as F

    from archc.kernels.delta_rule import delta_rule

    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(T * 7 + C)
    q = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(*((1, T, H) if per_head else (1, T, H, K)), generator=gen)).clamp(min=g_min)
    if g_min < -5:
        g = g * 6  # strong decay: up to ~-600 nats per token
    if g_const is not None:
        g = torch.full_like(g, g_const)
    beta = torch.rand(1, T, H, generator=gen)
    h0 = torch.randn(1, H, K, V, generator=gen) if init else None
    do = torch.randn(1, T, H, V, generator=gen)
    dht = torch.randn(1, H, K, V, generator=gen)
    xs = [x.to(dtype) if x is not None else None for x in (q, k, v, g, beta, h0)]

    def run(impl, inputs):
        leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
        o, ht = delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=final, chunk_size=C, impl=impl)
        loss = (o.float() * do).sum() + ((ht * dht).sum() if final else 0)
        loss.backward()
        return o.detach(), ht, [x.grad if x is not None else None for x in leaves]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    o_ref, s_ref, g_ref = run("reference", [x.float() if x is not None else None for x in xs])
    o, s, grads = run("triton", xs)
    out = {"o": rel(o, o_ref), "o_dtype_ok": o.dtype == dtype, "final_is_none": s is None}
    if final:
        out["final_state"] = rel(s, s_ref)
    for name, a, b in zip(GRAD_NAMES, grads, g_ref):
        if b is not None:
            out["d" + name] = rel(a, b) if torch.isfinite(a).all() else float("inf")
    dg_err = (grads[3].double() - g_ref[3].double()).abs().max() / g_ref[1].double().abs().max()
    out["dg_vs_dk"] = dg_err.item() if torch.isfinite(grads[3]).all() else float("inf")
    return out


def _intra_backward_cross_check():
    """The Triton intra-chunk backward vs autograd through its PyTorch form (same inter kernels)."""
    import torch

    from archc.kernels import _triton_delta_rule as tdr
    from archc.kernels.delta_rule import delta_rule_triton

    gen = torch.Generator().manual_seed(0)
    T, H, K, V = 24, 1, 16, 16
    xs = [torch.randn(1, T, H, K, generator=gen), torch.randn(1, T, H, K, generator=gen),
          torch.randn(1, T, H, V, generator=gen), -torch.rand(1, T, H, K, generator=gen),
          torch.rand(1, T, H, generator=gen), torch.randn(1, H, K, V, generator=gen)]
    xs[0], xs[1] = torch.nn.functional.normalize(xs[0], dim=-1), torch.nn.functional.normalize(xs[1], dim=-1)
    results = []
    for mode in ("triton", "torch"):
        tdr.INTRA_BACKWARD = mode
        leaves = [x.clone().requires_grad_() for x in xs]
        o, s = delta_rule_triton(*leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=16)
        (o.sum() + s.square().sum()).backward()
        results.append([x.grad for x in leaves])
    tdr.INTRA_BACKWARD = "triton"
    return {"d" + n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(GRAD_NAMES, *results)}


def _child_main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {name: _run_case(*args) for name, args in CASES.items()}
    out["intra_backward_cross_check"] = _intra_backward_cross_check()
    print("RESULTS " + json.dumps(out))


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
def test_triton_matches_reference(case):
    res = _results()[case]
    dtype, final = CASES[case][8], CASES[case][7]
    tol = FP32_TOL if dtype == "float32" else BF16_TOL
    assert res["o_dtype_ok"]
    assert res["o"] < tol, res
    if final:
        assert res["final_state"] < FP32_TOL, res  # the final state is fp32 in every path
    else:
        assert res["final_is_none"]
    steep = len(CASES[case]) > 10  # g_const given
    for name in GRAD_NAMES:
        if steep and name == "g":
            assert res["dg_vs_dk"] <= DG_VS_DK_TOL, res
        elif "d" + name in res:
            assert res["d" + name] < tol, (name, res)


def test_triton_intra_backward_matches_autograd():
    res = _results()["intra_backward_cross_check"]
    assert set(res) == {"d" + n for n in GRAD_NAMES}
    assert max(res.values()) < FP32_TOL, res
