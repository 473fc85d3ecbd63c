"""Shared fixtures: generated code is snapshotted as real .py files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for reference_models


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
