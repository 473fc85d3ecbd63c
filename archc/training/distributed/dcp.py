"""FSDP2 checkpoints in `OUT/dcp/step_N/` through torch.distributed.checkpoint (DCP), so a run saved on N
processes resumes on M; loaded only when every file is the one the save wrote.

DCP's reader unpickles `.metadata`, so a replaced file would run code on `--resume`. After every rank has
written its files, rank 0 records the size and sha256 of each file of the directory (digests.py) in archc's
own JSON, `trainer.json` (with the step, the scheduler state and the run's meta), written atomically, last.
A resume takes the newest directory that has this record (one without is a save that never finished: it is
skipped, with a notice) and refuses it, before DCP reads a byte, if a file differs from the record, is
missing, or was added.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from archc.training import digests
from archc.training.checkpoint import STEP_DIR, CheckpointError, check_expect
from archc.training.config import TrainError
from archc.training.run_dir import notice, write_atomic

RECORD = "trainer.json"


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "dcp" / f"step_{step:08d}"


def save(trainer, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    path = step_dir(trainer.out_dir, step)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    dist.barrier()  # every rank's files are on disk before they are digested
    if dist.get_rank() == 0:
        record = {"step": step, "meta": trainer.checkpoint_meta(step), "scheduler": trainer.scheduler.state_dict(),
                  "files": digests.record(path, exclude=(RECORD,))}
        write_atomic(path / RECORD, json.dumps(record) + "\n")
    dist.barrier()


def load(trainer) -> dict:
    """Restore the newest recorded DCP checkpoint into the (sharded) model, optimizer and scheduler."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = trainer.out_dir / "dcp"
    found = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    if not found:
        raise TrainError(f"--resume: no DCP checkpoint in {root}; start without --resume")
    path, unfinished = _newest_recorded(found)
    if unfinished and dist.get_rank() == 0:
        notice(f"skipped {', '.join(str(p) for p in unfinished)} (no {RECORD}: the save did not finish)"
               + (f"; using {path}" if path else ""))
    if path is None:
        raise TrainError(f"--resume: no finished DCP checkpoint in {root}; start without --resume")
    record = _read_record(path)
    why = digests.mismatch(path, record.get("files"), exclude=(RECORD,)) if "files" in record else \
        f"{RECORD} holds no digests of its files"
    if why:
        raise CheckpointError(f"refusing to load DCP checkpoint {path}: {why}. torch.distributed.checkpoint "
                              "unpickles .metadata, so archc loads only the files its save recorded; resume from "
                              "a checkpoint you trust, or start a new run")
    meta = {**record["meta"], "step": record["step"]}
    check_expect(path, meta, trainer.resume_expect())
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer.scheduler.load_state_dict(record["scheduler"])
    return meta


def _newest_recorded(found: list[Path]) -> tuple[Path | None, list[Path]]:
    unfinished = []
    for path in reversed(found):
        if (path / RECORD).is_file():
            return path, unfinished
        unfinished.append(path)
    return None, unfinished


def _read_record(path: Path) -> dict:
    try:
        record = json.loads((path / RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"refusing to load DCP checkpoint {path}: {RECORD} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not {"step", "meta", "scheduler"} <= record.keys():
        raise CheckpointError(f"refusing to load DCP checkpoint {path}: {RECORD} is not a record written by this "
                              "archc (step, meta, scheduler and files expected)")
    return record
