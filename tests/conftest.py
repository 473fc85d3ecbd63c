"""Shared fixtures: generated code is snapshotted as real .py files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from archc.dsl import parse_file
from archc.dsl.planned import unbuilt

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for reference_models

def vocabulary():
    """What the compiler lets a spec call, as the name resolver (archc.dsl.resolve) takes it."""
    from archc.compiler import ops

    return ops.vocabulary()


# Specs that use a construct not built yet (archc/dsl/planned.py) parse but do not compile;
# tests that compile every spec take BUILT_SPECS, and test_parser.py checks the others.
ALL_SPECS = sorted(SPECS.glob("*.arch"))
PLANNED_SPECS = [p for p in ALL_SPECS if unbuilt(parse_file(p, unbuilt=True))]
BUILT_SPECS = [p for p in ALL_SPECS if p not in PLANNED_SPECS]


class PythonSnapshot(SingleFileSnapshotExtension):
    file_extension = "py"
    _write_mode = WriteMode.TEXT


@pytest.fixture
def snapshot_py(snapshot):
    return snapshot.with_defaults(extension_class=PythonSnapshot)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (directory, transformers model): small random checkpoints, built once per session
    (hf_checkpoints.py); skips without transformers."""
    pytest.importorskip("transformers")
    from hf_checkpoints import Checkpoints

    return Checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small text corpus for training tests (the trainer's own source, three times), one per test module."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text((ROOT / "archc" / "training" / "trainer.py").read_text() * 3)
    return str(path)


def interpreted_results(test_file: str, timeout: int = 600) -> dict:
    """Run `test_file` as a script with TRITON_INTERPRET=1 (the variable must not leak into this process's
    other tests) and return the JSON it prints on its `RESULTS ` line; a failed run fails the test."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, test_file], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreted Triton run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULTS "):])
