"""`archc train`: train a compiled spec, on one process or on several (FSDP2, DiLoCo, torchft).

`train()` picks the mode's strategy and runs the one training loop (trainer.py): here, on one process, or
in every process of a distributed run (distributed/launch.py). Before anything is written it claims the run
directory (run_dir.py): a fresh run refuses a directory holding an earlier run unless `overwrite`, and
every run locks its directory for as long as it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from archc.dsl.diagnostics import SpecError
from archc.training import stages
from archc.training.config import RunResult, TrainConfig, TrainError
from archc.training.run_dir import claim


def train(spec, config: TrainConfig | None = None, overrides: dict[str, Any] | None = None, resume: bool = False,
          on_step: Callable[[dict], None] | None = None, *, overwrite: bool = False, nproc: int | None = None,
          diloco=None, fault_tolerant=None, **compile_kw) -> RunResult | None:
    """Compile `spec` and train it; the API behind `archc train`.

    One process unless `nproc` (FSDP2 data parallel over that many processes), `diloco` (a DiLoCoConfig:
    one process per replica) or `fault_tolerant` (an FTConfig: torchft replica groups) is given, or the
    process runs under torchrun. `resume` continues the run in `config.out_dir` from its newest whole
    checkpoint; `overwrite` deletes an earlier run there first. `on_step(record)` (one process only) sees
    each step's metrics after its checkpoint (if any) is written. Returns None in processes other than the
    lead of a distributed run.
    """
    from archc.training.distributed.launch import run, under_torchrun

    config = config or TrainConfig()
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise TrainError(f"--nproc {nproc!r}: expected a number of processes, at least 1")
    if nproc is not None and diloco is not None:
        raise TrainError(f"--nproc {nproc} with --diloco: DiLoCo runs one process per replica (replicas="
                         f"{diloco.replicas}); drop --nproc")
    if nproc is None and diloco is None and fault_tolerant is None and not under_torchrun():
        from archc.training.strategy import SingleProcess
        from archc.training.trainer import Trainer

        with claim(Path(config.out_dir), resume=resume, overwrite=overwrite):
            stage, prepare = _first_stage(spec, config, overrides, compile_kw), None
            if stage is not None:  # (stages.py) train the model the patcher reads first, then this one with it
                def run_one(first_spec, first_config, first_resume, first_overwrite):
                    with claim(Path(first_config.out_dir), resume=first_resume, overwrite=first_overwrite):
                        return Trainer(first_spec, first_config, SingleProcess(), stage.overrides,
                                       resume=first_resume, compile_kw=compile_kw).run()

                weights = stages.run_first_stage(stage, config, resume=resume, overwrite=overwrite, run=run_one)
                prepare = stages.load_frozen(stage, weights)
                resume = resume and stages.has_checkpoint(Path(config.out_dir))  # else stage 2 starts now
            return Trainer(spec, config, SingleProcess(), overrides, resume=resume, on_step=on_step,
                           compile_kw=compile_kw, prepare=prepare).run()
    if _first_stage(spec, config, overrides, compile_kw) is not None:
        raise TrainError("staged training (the entropy model, then the model) runs on one process; drop --nproc, "
                         "--diloco and --fault-tolerant")
    if on_step is not None:
        raise TrainError("on_step works on one process only")
    return run(spec, config, overrides, nproc=nproc, diloco=diloco, fault_tolerant=fault_tolerant, resume=resume,
               overwrite=overwrite, compile_kw=compile_kw)


def _first_stage(spec, config: TrainConfig, overrides, compile_kw) -> stages.Stage | None:
    import archc

    if config.init_from is not None:
        return None
    return stages.first_stage(archc.compile(spec, overrides or {}, **compile_kw))


__all__ = ["RunResult", "SpecError", "TrainConfig", "TrainError", "train"]
