"""`archc plan` against the worked numbers of "How To Scale Your Model" (Austin et al., 2025: "the book").

Each book check quotes the chapter and the figure it reproduces. Chapters, by their file in the book's
repository: transformers.md ("Transformer Math"), training.md ("How to Parallelize a Transformer for
Training"), applied-training.md ("Training LLaMA 3 on TPUs"), applied-inference.md ("Serving LLaMA 3"),
gpus.md ("How to Think About GPUs"). The rest checks the model's own arithmetic against hand formulas.
"""

from __future__ import annotations

import math

import attrs
import pytest
from conftest import SPECS

import archc
from archc.cli import main
from archc.compiler import analysis, hardware, plan

# LLaMA 3-70B (applied-training.md, "What Does LLaMA 3 Look Like?"): L 80, D 8,192, F 28,672 (3.5 D),
# N 64 heads, K 8 kv heads, H 128, V 128,256.
LLAMA3_70B = {"d_model": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "d_ff": 28672, "vocab": 128256}


@pytest.fixture(scope="module")
def llama70b():
    return archc.compile(SPECS / "llama.arch", **LLAMA3_70B)


def setting(compiled, hw, devices, batch, seq, dtype="bf16"):
    return plan.Setting(compiled.ir, hw, devices, batch, seq, dtype, None, plan.model_facts(compiled.ir))


# ---- Training LLaMA 3 on TPUs (applied-training.md) ------------------------------------------------------


def test_llama3_70b_parameter_count(llama70b):
    # "FFW params ... 8,192 * 8,192 * 3.5 * 3 * 80 = 56.3e9; Vocab params 2 * 128,256 * 8,192 = 2.1e9;
    #  Attention params 80 * (2 * 8,192 * 64 * 128 + 2 * 8,192 * 8 * 128) = 12e9; ... = 70.4e9"
    ffw = 8192 * 28672 * 3 * 80
    vocab = 2 * 128256 * 8192
    attention = 80 * (2 * 8192 * 64 * 128 + 2 * 8192 * 8 * 128)
    norms = 80 * 2 * 8192 + 8192  # RMSNorm scales, which the book leaves out
    assert llama70b.num_params() == ffw + vocab + attention + norms == 70_553_706_496
    assert llama70b.num_params() == pytest.approx(70.4e9, rel=0.003)


def test_llama3_70b_training_flops_per_token(llama70b):
    # "we do roughly 6 * param count FLOPs per token, so here that's roughly 6 * 70e9 = 4.2e11 FLOPs / token
    #  ... this should take roughly 4.2e11 / 4.59E+14 = 1ms on a single TPU v5p chip"
    v5p = hardware.load("v5p")
    p = llama70b.plan(v5p, devices=1, batch=1, seq=16)  # a short sequence: attention FLOPs negligible
    per_token = p.train_flops / 16
    # 6N less the embedding lookup, which is no matmul: 6 (N - V D)
    assert per_token == pytest.approx(6 * (llama70b.num_params() - 128256 * 8192), rel=1e-3)
    assert per_token == pytest.approx(4.2e11, rel=0.01)
    assert p.flops_bound_s() / 16 == pytest.approx(4.2e11 / 4.59e14, rel=0.01)  # "1ms" a token


def test_llama3_70b_memory(llama70b):
    # "Params 2 * 70GB ~140GB; Optimizer State 8 * 70GB ~560GB" (bf16 weights, fp32 Adam moments)
    s = setting(llama70b, hardware.load("v5p"), 1, 1, 16)
    n = llama70b.num_params()
    weights, _grads, optimizer = s.state_bytes(n, n)
    assert weights == 2 * n == pytest.approx(140e9, rel=0.01)
    assert optimizer - plan.MASTER * n == 8 * n == pytest.approx(560e9, rel=0.01)  # moments; master apart
    fp32 = attrs.evolve(s, dtype="fp32")
    assert fp32.state_bytes(n, n)[2] == 8 * n  # fp32 weights are their own master copy


def test_llama3_70b_gradient_checkpoints(llama70b):
    # "Gradient Checkpoints 2 * 8192 * 4e6 * 3 * 80 ~15.8TB" (a [tokens, D] bf16 array 3 times per layer);
    # a plan keeps each layer's input once, so a third of it, for a batch of 4e6 tokens.
    sizes = analysis.sizes_for(llama70b.ir, 1000, 4000)
    act = plan.activations(llama70b.ir, tuple(analysis.layer_scopes(llama70b.ir)), sizes, 2)
    assert act.checkpoints == 2 * 8192 * 4e6 * 80
    assert 3 * act.checkpoints == pytest.approx(15.8e12, rel=0.01)
    assert act.recompute < act.full


def test_llama3_70b_sharding_on_a_v5p_pod(llama70b):
    # "a per-TPU batch size of 4 * 1024 * 1024 / 8960 = 468 tokens. ... we become ICI-bound by FSDP when
    #  per device batch size < 2550 / n_axes ... with a full 3D pod ... a lower bound of 850, which we're
    #  well below. So the answer is no" -- and then "roughly 2048-way FSDP and 4-way model parallelism".
    v5p = hardware.load("v5p")
    p = llama70b.plan(v5p, devices=8960, batch=1024, seq=4096)
    assert 1024 * 4096 / 8960 == pytest.approx(468, abs=0.5)
    assert plan.network_intensity(v5p, "bf16", 8960, 8960) == pytest.approx(850, rel=0.001)
    options = {o.name: o for o in p.options}
    assert options["FSDP"].bound == "communication"
    assert p.best.name == "FSDP+TP" and p.best.bound == "compute"
    assert "tp=4" in p.best.degrees.split()
    assert "(here 468)" in p.best.why


def test_ici_intensity_on_one_axis_and_tensor_parallel_limits(llama70b):
    # training.md: "For TPUv5p, C=4.6e14 and W=2 * 9e10 for 1D data parallelism over ICI, so our batch
    # size per chip must be at least 2,550"; applied-training.md: "We would be ICI bound with pure model
    # parallelism when Y > F / 2550 = 11" and "comms-bound if our per-chip batch size is less than
    # 2 * 2550^2 / F = 453".
    one_axis = attrs.evolve(hardware.load("v5p"), intra_bw=2 * 9e10)
    alpha = plan.network_intensity(one_axis, "bf16", 8960, 8960)
    assert alpha == pytest.approx(2550, rel=0.001)
    f = plan.model_facts(llama70b.ir)
    assert f.ffw == 28672 and f.regions == 160  # attention and MLP residual updates in 80 layers
    assert f.ffw / alpha == pytest.approx(11.2, abs=0.05)
    assert 2 * alpha**2 / f.ffw == pytest.approx(453, abs=1)


# ---- How to Think About GPUs (gpus.md) ------------------------------------------------------------------------


def test_h100_data_parallel_critical_batch():
    # "Within a node, we just need the per-GPU token batch size > 990e12 / 450e9 = 2200.
    #  Within an SU or at the spine level, BS > 990e12 / 400e9 = 2475." (asymptotically: the ring's
    #  (X-1)/X factor is kept here, so 8 GPUs give 7/8 of the first and 1024 GPUs 127/128 of the second)
    h100 = hardware.load("h100")
    assert plan.network_intensity(h100, "bf16", 8, 8) * 8 / 7 == pytest.approx(2200, rel=0.002)
    assert plan.network_intensity(h100, "bf16", 1024, 8) * 128 / 127 == pytest.approx(2475, rel=0.002)


def test_h100_collective_times():
    h100 = hardware.load("h100")
    # Pop Quiz 1: AllGather(bf16[B_X, F]), B=1024, F=16,384 on an 8xH100 node: "(2 B F (8 - 1)) /
    # (8 * 450e9) ... 65us"
    assert plan.gather_seconds(h100, 2 * 1024 * 16384, 8, 8) == pytest.approx(65.2e-6, rel=0.01)
    # "the cost is B (N - 1) / (W N^2)" for an AllToAll of B bytes in a node (each GPU holds B / N) ...
    b = 8e9
    assert plan.all_to_all_seconds(h100, b / 8, 8, 8) == pytest.approx(b * 7 / (450e9 * 64))
    # ... and "B (M - 1) / (M^2 W_node egress)" spanning M nodes: 2 nodes, 16 GPUs
    assert plan.all_to_all_seconds(h100, b / 16, 16, 8) == pytest.approx(b * 1 / (4 * 400e9))
    # beyond a node an AllGather costs "bytes / W_node egress" (with the ring's (M-1)/M)
    assert plan.gather_seconds(h100, b, 64, 8) == pytest.approx(b * 7 / 8 / 400e9)


# ---- Inference (inference.md, applied-inference.md) ------------------------------------------------------------


def test_llama3_70b_kv_cache_and_decode_bounds(llama70b):
    # "KV cache size per token in int8 = 2 * K * H * L = 2 * 8 * 128 * 80 = 160kiB" (324kB in bf16);
    v5e = hardware.load("v5e")
    p = llama70b.plan(v5e, devices=16, batch=43, seq=8192)
    assert p.inference.kv_bytes_per_token == 2 * 8 * 128 * 80 * 2 == 327_680
    # "bf16 ... 4x4 = 16 chips ... remaining HBM for KV caches 116 ... num KV caches @ 8k: 43" and "the
    #  largest batch size that fits ... 16GB / 8.2e11 = 19ms / step"
    assert p.inference.fits_batch in (42, 43)
    assert p.inference.decode_s == pytest.approx(19e-3, rel=0.05)
    # "FFW blocks are compute bound when B > 240" (bf16 weights and FLOPs on v5e)
    short = llama70b.plan(v5e, devices=16, batch=43, seq=8)
    assert short.inference.critical_batch == pytest.approx(240, rel=0.03)


def test_decode_and_prefill_intensity(llama70b):
    # Prefill is compute-bound at long sequences; decoding small batches is memory-bound (inference.md).
    h100 = hardware.load("h100")
    p = llama70b.plan(h100, devices=8, batch=16, seq=4096)
    ridge = h100.ridge("bf16")
    assert p.inference.prefill.flops / p.inference.prefill.bytes > ridge
    assert p.inference.decode_intensity < ridge
    i = p.inference
    # per step: the weights, every sequence's whole KV cache; FLOPs 2 N_active per token plus attention
    assert i.decode_bytes == pytest.approx(llama70b.num_params() * 2 + 16 * 4096 * 327_680)
    assert i.tokens_per_s_per_device(8) == pytest.approx(16 / i.decode_s / 8)


# ---- the families -------------------------------------------------------------------------------------------------


def test_moe_active_params_and_expert_parallel():
    compiled = archc.compile(SPECS / "mixtral.arch", d_model=256, d_expert=896, n_layers=4)
    f = plan.model_facts(compiled.ir)
    experts = sum(r.params for r in f.experts)
    assert f.experts[0].experts == 8 and f.experts[0].top_k == 2
    assert experts == 4 * 8 * 3 * 256 * 896
    assert f.active == f.params - experts * 6 / 8
    h100 = hardware.load("h100")
    p = compiled.plan(h100, devices=16, batch=64, seq=512)
    ep = next(o for o in p.options if o.name == "EP+FSDP")
    a2a = next(c for c in ep.comms if c.what.startswith("all-to-all"))
    z = int(ep.degrees.split()[0].removeprefix("ep="))
    local = 4 * (64 / 16) * 512 * 2 * 256 * 2 * 4  # 4 all-to-alls of k D bf16 per token, 4 MoE layers
    assert a2a.seconds == pytest.approx(plan.all_to_all_seconds(h100, local, z, min(z, 8)))
    top4 = archc.compile(SPECS / "mixtral.arch", d_model=256, d_expert=896, n_layers=4, top_k=4)
    ep4 = next(o for o in top4.plan(h100, devices=16, batch=64, seq=512).options if o.name == "EP+FSDP")
    if ep4.degrees.split()[0] == ep.degrees.split()[0]:
        assert next(c for c in ep4.comms if c.what.startswith("all-to-all")).seconds == pytest.approx(2 * a2a.seconds)
    assert "N/N_active" in p.options[0].why


def test_linear_mixer_keeps_state_not_kv_cache():
    compiled = archc.compile(SPECS / "gated_deltanet.arch")
    h100 = hardware.load("h100")
    short = compiled.plan(h100, batch=4, seq=256).inference
    long = compiled.plan(h100, batch=4, seq=4096).inference
    assert short.kv_bytes_per_token == 0
    state = sum(analysis.recurrent_state(compiled.ir).values()) * 4
    assert short.state_bytes_per_sequence == state > 0
    assert long.decode_bytes == short.decode_bytes  # no cache grows with the context
    llama = archc.compile(SPECS / "llama.arch")
    assert llama.plan(h100, batch=4, seq=4096).inference.decode_bytes > llama.plan(h100, batch=4, seq=256).inference.decode_bytes


def test_windowed_and_sparse_attention_cost_grows_linearly():
    # Doubling T: windowed attention doubles its cost (linear in T), full attention more than doubles
    # (quadratic), NSA in between (selection and window linear, compression T^2 / stride).
    h100 = hardware.load("h100")

    def growth(spec, **overrides):
        compiled = archc.compile(SPECS / spec, **overrides)
        short, long = (compiled.plan(h100, batch=1, seq=t).train_flops for t in (2048, 4096))
        return long / short

    windowed, nsa, dense = growth("sliding_window.arch", global_every=1000), growth("nsa.arch"), growth("llama.arch")
    assert windowed == pytest.approx(2.0, abs=0.01)
    assert 2.0 < nsa < dense


def test_diloco_bytes(llama70b):
    # Bytes as archc.training.distributed.diloco counts them: an all_reduce sends 2 (W-1)/W n 4 bytes.
    h100 = hardware.load("h100")
    p = llama70b.plan(h100, devices=64, batch=1024, seq=4096, inner_steps=100)
    d = p.diloco
    n = llama70b.num_params()
    assert d.replicas == 8
    assert d.bytes_per_outer_step == 2 * 7 / 8 * n * 4
    assert d.bytes_per_token == 8 * d.bytes_per_outer_step / (100 * 1024 * 4096)
    assert d.dp_bytes_per_token / d.bytes_per_token == pytest.approx(100 * 2 / 4)  # H x bf16 / fp32


# ---- the per-op roofline -------------------------------------------------------------------------------------------


def test_op_rows_are_flops_bytes_and_max_of_the_two():
    compiled = archc.compile(SPECS / "llama.arch", n_layers=2)
    h100 = hardware.load("h100")
    r = plan.roofline(compiled.ir, h100, "bf16", 4, 512)
    down = next(row for row in r.rows if row.name == "layers.*.mlp.down")
    bt, f, d = 4 * 512, 344, 128
    assert down.count == 2
    assert down.flops == 2 * 2 * bt * f * d
    assert down.bytes == 2 * 2 * (bt * f + f * d + bt * d)
    assert down.seconds == pytest.approx(2 * max(2 * bt * f * d / 989e12, 2 * (bt * f + f * d + bt * d) / 3.35e12))
    mul = next(row for row in r.rows if row.name == "layers.*.mlp.mul")
    assert mul.flops == 0 and mul.bytes == 2 * 3 * bt * f * 2  # two reads, one write
    assert r.seconds == pytest.approx(sum(row.seconds for row in r.rows))


def test_plan_recommends_data_parallel_for_a_small_model():
    # A model that fits one device and a big batch: plain data parallelism (the book: "When your model fits
    # on a single chip ... you should always use simple data parallelism").
    compiled = archc.compile(SPECS / "llama.arch")
    p = compiled.plan("h100", devices=8, batch=256, seq=2048)
    assert p.best.name == "DP" and p.best.bound == "compute"


# ---- the command line --------------------------------------------------------------------------------------------


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan(capsys):
    code, out, err = run(capsys, "plan", str(SPECS / "llama.arch"), "--hardware", "h100", "--devices", "64",
                         "--batch", "1024", "--seq", "4096", *(x for k, v in LLAMA3_70B.items() for x in ("-D", f"{k}={v}")))
    assert code == 0, err
    assert "recommended:" in out and "KV cache 327,680 bytes per token" in out and "layers.*.mlp.down" in out


@pytest.mark.parametrize("argv, code, message", [
    (["--hardware", "h100", "--devices", "0"], 1, "--devices: expected a positive integer, got 0"),
    (["--hardware", "h10"], 1, "did you mean `h100`?"),
    (["--hardware", "h100", "--batch", "-4"], 2, "--batch and --seq must be positive"),
    (["--hardware", "h100", "--dtype", "fp4"], 1, "lists no fp4 peak"),
    (["--hardware", "h100", "--dtype", "bf61"], 1, "did you mean `bf16`?"),
    (["--hardware", "local", "--devices", "2"], 1, "--hardware local is this one machine"),
    (["--hardware", "v5p", "--dim", "X=0"], 1, "--dim X: expected a positive integer"),
])
def test_cli_plan_bad_flags(capsys, argv, code, message):
    got, _out, err = run(capsys, "plan", str(SPECS / "llama.arch"), *argv)
    assert got == code and message in err and "Traceback" not in err


def test_cli_plan_local_measures_this_machine(capsys):
    code, out, err = run(capsys, "plan", str(SPECS / "llama.arch"), "--hardware", "local", "--batch", "2",
                         "--seq", "64")
    assert code == 0, err
    assert "hardware: measured:" in out and "GFLOP/s" in out and "recommended: one device" in out


def test_hardware_data_is_complete():
    for name in ("h100", "h200", "b200", "v5e", "v5p"):
        hw = hardware.load(name)
        assert hw.peak("bf16") > 1e14 and hw.hbm_bytes > 1e10 and hw.hbm_bw > 1e11
        assert hw.intra_bw > 0 and hw.inter_bw > 0 and hw.devices_per_node >= 8
        assert not math.isinf(hw.ridge("bf16"))


@pytest.mark.parametrize("head_dim, d_model", [(32, 128), (64, 256)])
def test_chunked_gated_deltanet_intermediates_match_what_autograd_keeps(head_dim, d_model):
    # The chunked PyTorch form of Gated DeltaNet keeps far more than its inputs for the backward pass;
    # analysis.chunked_floats counts it, checked here against the storage autograd actually holds.
    torch = pytest.importorskip("torch")
    compiled = archc.compile(SPECS / "gated_deltanet.arch", n_layers=1, head_dim=head_dim, d_model=d_model)
    model = compiled.build()
    module = next(m for m in model.modules() if type(m).__name__ == "GatedDeltaNetCore")
    captured = {}
    module.register_forward_pre_hook(lambda _m, args: captured.setdefault("args", args))
    batch, seq = 2, 128
    model(torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0)))
    args = [a.detach().clone().requires_grad_() if a is not None and a.is_floating_point() else a
            for a in captured["args"]]
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
    inputs = sum(a.numel() * 4 for a in args if a is not None)
    node = next(n for n in compiled.ir.nodes() if n.op == "gated_deltanet_core")
    expected = 4 * analysis.chunked_floats(compiled.ir, node, analysis.sizes_for(compiled.ir, batch, seq))
    assert sum(storages.values()) == pytest.approx(expected, rel=0.1)
    assert expected > 5 * inputs  # what the IR alone shows is a small part of it
    del out
