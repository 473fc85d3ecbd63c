"""The Triton face of archc.kernels.grouped_gemm.

Where to run: ``TRITON_INTERPRET=1`` must be set before the kernels are first
imported, and must not leak into other test modules.  So in an ordinary
(CPU) pytest run, `test_triton_suite_interpreted` re-runs this file in a
subprocess with the variable set; the tests marked `triton_runtime` are
skipped in the parent and run there, on CPU tensors, at tiny shapes (see
CASES in test_grouped_gemm.py: N <= 40, K, M <= 48, E <= 5).  On a CUDA
machine they also run in the parent, on the GPU, and `test_cuda_large`
(marker `gpu`) checks realistic shapes.  `test_kernels_compile_for_sm90`
compiles the kernels for Hopper without a GPU (bundled ptxas), so a change
that only the interpreter accepts still fails here.

Tolerances are those of test_grouped_gemm.TOL (fp32 / bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from test_grouped_gemm import CASES, DTYPES, TOL, assert_face_matches, make_inputs, run_face, truth

from archc.kernels import grouped_gemm as gg


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


# pytest only calls pytest_configure hooks of conftest files and plugins, never
# of a test module: register the marker on the running config ourselves before
# `pytest.mark.gpu` is looked up below (else: PytestUnknownMarkWarning).
if getattr(pytest.mark, "_config", None) is not None:
    pytest_configure(pytest.mark._config)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = gg.triton_available()
DEVICE = "cpu" if INTERPRET else "cuda"

triton_runtime = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or HAS_CUDA),
    reason="runs in the TRITON_INTERPRET=1 subprocess (test_triton_suite_interpreted) or on CUDA",
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(INTERPRET, reason="already the interpreted run")
def test_triton_suite_interpreted(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    root = Path(__file__).resolve().parents[2]
    report = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-p", "no:cacheprovider",
         "-W", "error::pytest.PytestUnknownMarkWarning", "-rs", f"--junitxml={report}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0, out[-8000:]
    assert ran >= 20, f"only {ran} Triton tests ran interpreted:\n{out[-4000:]}"


@triton_runtime
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_float64_truth(case, dtype):
    x, w, counts, dy = make_inputs(case, DTYPES[dtype], device=DEVICE)
    _, _, dw = assert_face_matches(gg.grouped_mm_triton, x, w, counts, dy, f"triton/{case}/{dtype}")
    assert (dw[torch.tensor(CASES[case][3], device=dw.device) == 0] == 0).all()  # empty experts: zeros


@triton_runtime
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_three_faces_agree(dtype):
    x, w, counts, dy = make_inputs("ragged_with_empty", DTYPES[dtype], device=DEVICE, seed=2)
    ref = run_face(gg.grouped_mm_reference, x, w, counts, dy)
    for impl in ("torch", "triton"):
        got = run_face(lambda *a: gg.grouped_mm(*a, impl=impl), x, w, counts, dy)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **TOL[DTYPES[dtype]])


@triton_runtime
@pytest.mark.parametrize(
    "config",
    [
        gg.TritonConfig(16, 16, 16, 16, num_warps=1, num_stages=1, num_programs=1),  # one program does all
        gg.TritonConfig(16, 32, 16, 32, num_warps=1, num_stages=1, num_programs=3),  # M=44 -> 32+12, rows in 32s
        gg.TritonConfig(32, 16, 32, 16, num_warps=1, num_stages=1, num_programs=16),  # more programs than tiles
    ],
    ids=["1prog", "3prog_bm32", "16prog_bn32"],
)
def test_persistent_schedules(config):
    x, w, counts, dy = make_inputs("multi_tile_5_experts", torch.float32, device=DEVICE, seed=3)
    assert_face_matches(lambda *a: gg.grouped_mm_triton(*a, config=config), x, w, counts, dy, str(config))


@triton_runtime
def test_zero_stride_grad_and_strided_inputs():
    g = torch.Generator().manual_seed(4)
    w_emk = torch.randn(3, 20, 24, generator=g).to(DEVICE)  # nn.Linear-style, K=24, M=20
    x_wide = torch.randn(13, 30, generator=g).to(DEVICE)
    x, w = x_wide[:, 3:27], w_emk.transpose(1, 2)
    counts = torch.tensor([6, 0, 7], device=DEVICE)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gg.grouped_mm_triton(x, w, counts).sum().backward()  # expanded (zero-stride) dy
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    gg.grouped_mm_reference(xd, wd, counts).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, **TOL[torch.float32])
    torch.testing.assert_close(w.grad.double(), wd.grad, **TOL[torch.float32])


@triton_runtime
def test_moe_pipeline_through_triton():
    from test_grouped_gemm import moe_grouped, reference_moe_loop

    g = torch.Generator().manual_seed(6)
    n, k, e, d, f = 11, 2, 4, 20, 18
    x = torch.randn(n, d, generator=g).to(DEVICE)
    w = torch.randn(e, d, f, generator=g).to(DEVICE)
    weights, expert_idx = torch.rand(n, e, generator=g).to(DEVICE).topk(k, dim=-1)
    got = moe_grouped(x, w, expert_idx, weights, impl="triton")
    want = reference_moe_loop(x.double(), w.double(), expert_idx, weights.double())
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(INTERPRET, reason="the interpreter does not compile")
def test_kernels_compile_for_sm90():
    """Compile (not run) both kernels for an H100 in bf16 with the launch-time
    specialisation Triton would apply to contiguous tensors (unit strides,
    16-divisible pointers/strides), and check the K loop is software-pipelined."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from archc.kernels import _triton_grouped_gemm as K

    cfg = gg._CUDA_16BIT

    def build(fn, sig, consts, div16):
        names = list(sig)
        sig = {n: ("constexpr" if n in consts else t) for n, t in sig.items()}
        src = ASTSource(fn, sig, {(names.index(n),): v for n, v in consts.items()},
                        {(names.index(n),): [["tt.divisibility", 16]] for n in div16})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                             enable_fp_fusion=True))

    common = dict(PRECISION="ieee", UPCAST_DOT=False)
    mm = build(
        K._grouped_mm_kernel,
        dict(x_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", offs_ptr="*i32", E="i32", M="i32", K="i32",
             stride_xn="i32", stride_xk="i32", stride_be="i32", stride_bk="i32", stride_bm="i32",
             stride_yn="i32", stride_ym="i32", num_progs="i32", BLOCK_N="constexpr", BLOCK_M="constexpr",
             BLOCK_K="constexpr", PRECISION="constexpr", UPCAST_DOT="constexpr"),
        dict(common, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
             stride_xk=1, stride_bm=1, stride_ym=1),
        ["x_ptr", "b_ptr", "y_ptr", "offs_ptr", "stride_xn", "stride_be", "stride_bk", "stride_yn", "M", "K"],
    )
    dw = build(
        K._grouped_mm_dw_kernel,
        dict(x_ptr="*bf16", dy_ptr="*bf16", dw_ptr="*bf16", offs_ptr="*i32", E="i32", K="i32", M="i32",
             stride_xn="i32", stride_xk="i32", stride_dn="i32", stride_dm="i32", stride_we="i32",
             stride_wk="i32", stride_wm="i32", num_progs="i32", BLOCK_K="constexpr", BLOCK_M="constexpr",
             BLOCK_R="constexpr", PRECISION="constexpr", UPCAST_DOT="constexpr"),
        dict(common, BLOCK_K=cfg.block_k, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r,
             stride_xk=1, stride_dm=1, stride_wm=1),
        ["x_ptr", "dy_ptr", "dw_ptr", "offs_ptr", "stride_xn", "stride_dn", "stride_we", "stride_wk", "K", "M"],
    )
    for c in (mm, dw):
        ttgir = c.asm["ttgir"]
        assert "warp_group_dot" in ttgir  # Hopper wgmma
        assert "async_copy_global_to_local" in ttgir  # pipelined loads
        assert c.metadata.shared <= 228 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or not HAS_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_cuda_large(dtype):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(7)
    e, k, m = 8, 500, 1000  # K, M not multiples of any block
    counts = torch.tensor([700, 0, 1, 2300, 513, 0, 90, 492])
    n = int(counts.sum())
    x = torch.randn(n, k, generator=g).to(dt).cuda()
    w = (torch.randn(e, k, m, generator=g) / k**0.5).to(dt).cuda()
    dy = torch.randn(n, m, generator=g).to(dt).cuda()
    counts = counts.cuda()
    got = run_face(gg.grouped_mm_triton, x, w, counts, dy)
    want = truth(x.cpu(), w.cpu(), counts.cpu(), dy.cpu())
    # K-sums of 500 (dX: 1000, dW: up to 2300) products: allow for the larger sums.
    tol = dict(rtol=2e-2, atol=5e-2) if dt == torch.bfloat16 else dict(rtol=1e-4, atol=1e-3)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        torch.testing.assert_close(a.cpu().double(), b, **tol, msg=lambda msg: f"{name}: {msg}")
    assert gg._auto_impl(x) == "triton"
