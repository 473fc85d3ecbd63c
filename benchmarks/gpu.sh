#!/usr/bin/env bash
# GPU checks in one go, for a CUDA machine: GPU-marked tests (if any), then the
# benchmarks at GPU-sized configs. Prints everything; finishes in < 8 minutes
# (each stage has its own timeout; together they add up to 480 s). Usage, from anywhere:
#
#     bash benchmarks/gpu.sh            # OUT=dir to also keep a copy of the log there
#
# Creates .venv with scripts/setup.sh if it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    echo "== .venv missing: running scripts/setup.sh"
    bash scripts/setup.sh || { echo "setup failed"; exit 1; }
fi
PY=.venv/bin/python
LOG=${OUT:+$OUT/gpu_bench.log}
exec > >(tee ${LOG:+"$LOG"}) 2>&1

START=$(date +%s)
status=0
stage() {  # stage NAME TIMEOUT_S CMD...: run with a timeout, report its time and exit code, keep going
    local name=$1 limit=$2; shift 2
    echo
    echo "==================== $name (timeout ${limit}s) ===================="
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "---- $name: rc=$rc in $(( $(date +%s) - t0 ))s"
    [ $rc -eq 124 ] && echo "---- $name: TIMED OUT"
    [ $rc -ne 0 ] && status=1
    return 0
}

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0))
EOF
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA device (CPU-only wheel?): nothing GPU-related to run here."
    exit 1
fi

# 1. Tests marked `gpu` (skipped gracefully when the suite has none).
$PY -m pytest -m gpu --collect-only -p no:cacheprovider >/dev/null 2>&1
collect_rc=$?
if [ $collect_rc -eq 0 ]; then
    stage "pytest -m gpu" 40 $PY -m pytest -q -m gpu -p no:cacheprovider
elif [ $collect_rc -eq 5 ]; then
    echo; echo "== no tests marked 'gpu': skipping pytest -m gpu"
else
    echo; echo "== pytest collection failed (rc=$collect_rc):"; $PY -m pytest -m gpu --collect-only -p no:cacheprovider | tail -20
    status=1
fi

# 2. Training-step time, generated vs hand-written LlamaFast, bf16, a ~0.9B-parameter Llama
#    (d_model 2048, 16 layers, 32 heads / 16 kv heads, d_ff 5504, vocab 32000), 16k tokens/step.
stage "step_time Llama bf16 d2048 L16 B8 T2048" 50 $PY benchmarks/step_time.py --models llama \
    --device cuda --dtype bf16 --d-model 2048 --layers 16 --vocab 32000 --batch 8 --seq 2048 --steps 10 --warmup 3

# 3. GPT-2 (~GPT-2 medium width) vs the reference GPT2, whose explicit attention keeps [B, H, T, T]
#    scores per layer: a shorter sequence keeps that in memory.
stage "step_time GPT-2 bf16 d1024 L12 B8 T1024" 35 $PY benchmarks/step_time.py --models gpt2 \
    --device cuda --dtype bf16 --d-model 1024 --layers 12 --vocab 32000 --batch 8 --seq 1024 --steps 10 --warmup 3

# 4. The small CPU default config on the GPU in fp32: launch-overhead bound, so it shows per-op overhead.
stage "step_time Llama fp32 default config" 20 $PY benchmarks/step_time.py --models llama --device cuda --dtype fp32

# 5. Training throughput (full steps with AdamW, as `archc train` runs them): generated Llama vs LlamaFast,
#    fp32 (TF32 matmuls) and bf16 autocast, a ~0.2B-parameter Llama (d_model 1024, 12 layers), 16k tokens/step.
stage "train_throughput Llama fp32+bf16 d1024 L12 B8 T2048" 40 $PY benchmarks/train_throughput.py --device cuda \
    --d-model 1024 --layers 12 --vocab 32000 --batch 8 --seq 2048 --steps 8 --warmup 2 --budget 30

# 6. One MoE layer, bf16: grouped GEMMs (Triton) vs the per-expert loop vs a dense SwiGLU of the same active
#    FLOPs, d_model 2048, 16k tokens, k·H = 4096 at 8/64/256 experts (top-2/8/32), with each size's top ops.
stage "moe layer bf16 d2048 16k tokens" 40 $PY benchmarks/moe.py --device cuda --dtype bf16 --d-model 2048 \
    --batch 8 --seq 2048 --active 4096 --steps 10 --warmup 2 --budget 30 --profile

# 7. Linear-attention mixers (linear attention, Mamba-2 SSD, Gated DeltaNet, KDA): forward+backward of the Triton
#    and chunked PyTorch paths vs the per-token recurrence vs causal SDPA, bf16, B=2, 8 heads x 64, T = 1k, 4k, 16k.
stage "mixers bf16 B2 H8 T1k-16k" 40 $PY benchmarks/mixers.py --device cuda --dtype bf16 --batch 2 --heads 8

# 8. Native Sparse Attention (paper sizes, 16 query heads on one KV head, head_dim 64): the Triton selection kernel
#    and the gather path vs causal SDPA (flash), forward+backward, bf16, T = 2k-64k; first checks triton == gather.
stage "nsa vs sdpa bf16 T2k-64k" 40 $PY benchmarks/attention.py --device cuda --dtype bf16 \
    --lengths 2048 8192 32768 65536

# 9. Sliding-window attention (window 256, sinks 4): the chosen kernel (flex_attention, compiled) vs SDPA with a
#    boolean mask vs full causal SDPA (flash), forward+backward, bf16, T = 2k-32k; cost should grow linearly in T.
stage "sliding window bf16 T2k-32k" 30 $PY benchmarks/sliding_window.py --device cuda --dtype bf16 \
    --sinks 4 --lengths 2048 8192 32768

# 10. `archc plan --hardware local` on the GPU: predicted (roofline of the IR with this GPU's measured TF32 matmul
#     peak and HBM bandwidth) vs measured training steps of a dense, an MoE and a Gated DeltaNet spec, fp32 (TF32).
stage "plan vs measured fp32 d1024 L8 B8 T2048" 35 $PY benchmarks/plan_vs_measured.py --device cuda --threads 0 \
    --d-model 1024 --layers 8 --batch 8 --seq 2048 --rounds 6 --warmup 2 --budget 25

# 11. Residual lanes: training steps of Llama with mHC n=4 (specs/mhc.arch) over the same Llama without lanes, bf16,
#     d_model 1024, 8 layers, 8k tokens/step (the mHC paper: 1.067x with fused kernels).
stage "lanes mhc n4 vs none bf16 d1024 L8" 30 $PY benchmarks/lanes.py --device cuda --dtype bf16 --threads 0 \
    --d-model 1024 --layers 8 --batch 8 --seq 1024 --steps 10 --warmup 2

# 12. Byte Latent Transformer (specs/blt.arch: d_local 512 with 1 encoder and 2 decoder layers, latent 1536 x 12
#     layers, threshold set for a mean patch of 4.5 bytes) vs the byte-level Llama (specs/byte_llama.arch, width 1024,
#     depth and MLP width solved) at equal training FLOPs per byte, bf16, 16k bytes/step (goal <= 1.2x).
stage "blt vs byte-level llama bf16 16k bytes" 40 $PY benchmarks/blt.py --device cuda --dtype bf16 --threads 0 \
    --batch 8 --seq 2048 --d-local 512 --d-global 1536 --global-layers 12 --llama-d-model 1024 --steps 10 \
    --warmup 2 --budget 15

# 13. DiT-B/2 (d_model 768, 12 layers, 12 heads; 32x32x4 latents in 2x2 patches, learned variance), bf16 autocast,
#     batch 64: training steps of the DiT generated from specs/dit.arch vs diffusers' DiTTransformer2DModel with the
#     same weights (imported through the DiT weight map; predictions checked in fp32 first). Goal <= 1.0x.
stage "dit vs diffusers bf16 DiT-B/2 B64" 40 $PY benchmarks/dit.py --device cuda --dtype bf16 --threads 0 \
    --d-model 768 --layers 12 --batch 64 --steps 10 --warmup 2 --budget 15

echo
echo "== total $(( $(date +%s) - START ))s, status=$status"
exit $status
