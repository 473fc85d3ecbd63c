"""Staged training: a model that holds another model it does not train itself — the BLT's entropy model, whose
entropies decide the patches and get no gradient through them — trains that model first.

Which model: `patch(ids, entropy(EntropyLM(ids) as entropy_model), ...)` reads the entropies of the block call
`entropy_model`; the first stage trains the model of a spec file the spec `use`s whose own model calls the same
block under the same label (specs/blt_entropy.arch for specs/blt.arch), so both have the weights
`entropy_model.*`. Stage 1 runs in OUT/entropy (its own metrics, checkpoints, config.json); stage 2, in OUT,
loads those weights into its model and freezes them before the optimizer is made. One Trainer runs both.

- `--entropy-checkpoint DIR`: stage 1 is skipped and the weights come from DIR (a stage-1 run directory or one
  of its checkpoints).
- `--entropy-steps N`: stage 1's steps (default: --steps).
- `--resume`: a stage 1 that did not reach its steps resumes; a finished one is kept; then stage 2 resumes from
  its newest checkpoint, or starts if stage 1 was still running.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from archc.training.config import RunResult, TrainConfig, TrainError

STAGE_DIR = "entropy"


@attrs.frozen
class Stage:
    """The model trained first: its module path in the spec's model, the block it calls, the spec training it."""

    path: str
    block: str
    spec: Path
    overrides: dict = attrs.field(factory=dict)  # the used file's parameters the main spec's -D set (`file.name`)


def first_stage(compiled) -> Stage | None:
    """The model the spec's patcher reads, to be trained first; None when the spec patches by no trained model."""
    import archc

    graph = compiled.ir
    for node in graph.nodes():
        args = graph.args(node.id)
        if node.op != "patch" or len(args) < 2:
            continue
        source = graph.node(args[1])
        if source.op == "entropy":
            source = graph.node(graph.args(source.id)[0])
        top = source.scope.split(".")[0]
        scope = graph.scopes.get(top)
        if not top or scope is None or scope.kind != "block":
            raise TrainError(f"`patch` at {_where(node)} reads entropies computed in the model itself, which get no "
                             "gradient through the patches; compute them with a block from a used spec file that "
                             "trains it: patch(ids, entropy(EntropyLM(bytes) as entropy_model))")
        for module in compiled.spec.modules[1:]:
            if any(block.is_model for block in module.blocks):
                used = Path(module.source.name)
                mine = {name.partition(".")[2]: value for name, value in compiled.params.items()
                        if name.rpartition(".")[0] == used.stem}
                other = archc.compile(used, mine).ir.scopes.get(top)
                if other is not None and other.cls == scope.cls:
                    return Stage(top, scope.cls, used, mine)
        raise TrainError(f"`patch` at {_where(node)} reads the entropies of `{top}` (block {scope.cls}), but no spec "
                         f"file this one uses has a model calling `{scope.cls}(...) as {top}` to train it first; "
                         "add one (as specs/blt_entropy.arch), or pass --entropy-checkpoint DIR")
    return None


def train_flops(compiled, batch: int, seq: int, dims: dict[str, int] | None = None) -> int:
    """FLOPs of one training step (3 x forward: forward, and backward at twice that), but the model a first stage
    trained (the BLT's entropy model) only runs forward: it is frozen and no gradient reaches it. `dims` sizes
    the other symbolic dimensions (the BLT's padded patch count P)."""
    import archc
    from archc.compiler.analysis import forward_flops

    total = forward_flops(compiled.ir, batch, seq, dims)
    stage = first_stage(compiled)
    frozen = 0 if stage is None else archc.compile(stage.spec, stage.overrides).flops(batch, seq)
    return 3 * (total - frozen) + frozen


def _where(node) -> str:
    span = node.span
    return f"{span.file}:{span.line}" if span is not None else "the spec"


def run_first_stage(stage: Stage, config: TrainConfig, *, resume: bool, overwrite: bool,
                    run: Callable[[Path, TrainConfig, bool, bool], RunResult]) -> Path:
    """Train (or resume, or keep) stage 1 in OUT/entropy; returns the directory its weights come from.

    `run(spec, config, resume, overwrite)` trains one spec (the caller's Trainer)."""
    if config.entropy_checkpoint is not None:
        return Path(config.entropy_checkpoint)
    out = Path(config.out_dir) / STAGE_DIR
    steps = config.entropy_steps or config.steps
    stage_config = attrs.evolve(config, out_dir=str(out), steps=steps)
    done = _last_step(out)
    if resume and done is not None and done >= steps:
        return out  # finished before: stage 2 was running
    run(stage.spec, stage_config, resume and done is not None, overwrite)
    return out


def has_checkpoint(run_dir: Path) -> bool:
    return _last_step(run_dir) is not None


def _last_step(run_dir: Path) -> int | None:
    from archc.training.checkpoint import latest_checkpoint, read_meta

    if not (run_dir / "checkpoints").is_dir():
        return None
    ckpt = latest_checkpoint(run_dir, notice=lambda _message: None)
    return None if ckpt is None else int(read_meta(ckpt)["step"])


def load_frozen(stage: Stage, weights: Path) -> Callable[[Any, torch.nn.Module], None]:
    """The Trainer's `prepare` for stage 2: stage 1's `<path>.*` weights loaded into the model, and frozen."""

    def prepare(compiled, model: torch.nn.Module) -> None:
        import archc
        from archc.training.checkpoint import CheckpointError, load_checkpoint

        first = archc.compile(stage.spec, stage.overrides).build(check_memory=False)
        try:
            load_checkpoint(weights, first, restore_rng=False)
        except CheckpointError as e:
            raise TrainError(f"--entropy-checkpoint {weights}: {e}") from None
        mine = model.get_submodule(stage.path)
        theirs = first.get_submodule(stage.path)
        try:
            mine.load_state_dict(theirs.state_dict())
        except RuntimeError as e:
            raise TrainError(f"the entropy model in {weights} does not fit `{stage.path}` of this spec: "
                             f"{str(e).splitlines()[-1].strip()}") from None
        mine.requires_grad_(False)

    return prepare
