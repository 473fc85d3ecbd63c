"""What a training run needs in memory at least, checked before the model is built.

Per process, in bytes (a lower bound: buffers, the autograd graph's bookkeeping, allocator slack and the
attention kernels' scratch are left out):

    weights      P x 4 (fp32, also under bf16 autocast), / shards under FSDP2
    gradients    P x 4, / shards
    optimizer    AdamW: two moments, P x 8; Muon: at least its momentum, P x 4; / shards
    outer state  DiLoCo: the global copy and the outer momentum, P x 8
    activations  every op's output kept for backward at this process's rows x --seq-len
                 (analysis.activation_bytes), in fp32, or 2 bytes per value under bf16 autocast

`processes` of the run share this machine (spawned ranks, DiLoCo replicas, supervised torchft groups), so
the whole machine must hold that many times one process's share. Too much is refused with the estimate;
`--no-memory-check` (TrainConfig.memory_check = False) skips the check.
"""

from __future__ import annotations

from archc.compiler import analysis
from archc.compiler.resources import check_fits, human_bytes

OPTIMIZER_BYTES = {"adamw": 8, "muon": 4}  # per parameter, at least


def training_bytes(compiled, config, rows: int, shards: int = 1, outer_bytes: int = 0) -> dict[str, float]:
    """The estimate's parts, per process: weights, gradients, optimizer, outer state, activations."""
    graph = compiled.ir
    params = compiled.num_params()
    sizes = analysis.sizes_for(graph, max(1, rows), config.seq_len)
    item = 2 if config.dtype == "bfloat16" else 4
    kept = sum(analysis.activation_bytes(graph, node, sizes, item) for node in graph.nodes())
    parts = {"weights": params * 4 / shards, "gradients": params * 4 / shards,
             f"{config.optimizer} state": params * OPTIMIZER_BYTES.get(config.optimizer, 8) / shards,
             "DiLoCo outer state": params * outer_bytes, "activations": kept}
    return {name: size for name, size in parts.items() if size}


def check_training_memory(compiled, config, device, rows: int, shards: int = 1, processes: int = 1,
                          outer_bytes: int = 0) -> None:
    """Refuse (ResourceError) a run whose estimate, times the `processes` sharing this machine, exceeds the
    memory free on `device`."""
    parts = training_bytes(compiled, config, rows, shards, outer_bytes)
    each = ", ".join(f"{name} {human_bytes(size)}" for name, size in parts.items())
    times = f" per process, x {processes} processes" if processes > 1 else ""
    what = (f"training {compiled.class_name} ({compiled.num_params():,} parameters, {rows} rows x "
            f"{config.seq_len} tokens)")
    check_fits(sum(parts.values()) * processes, what, each + times, device,
               "lower --batch-size or --seq-len, or shrink the spec's parameters (-D)")
