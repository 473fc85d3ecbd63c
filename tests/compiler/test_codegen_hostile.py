"""Spec-derived text never becomes code: hostile file names, `name=` and str parameters."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import archc

SPEC = """
param vocab: int = 32
param d: int = 16
param note: str = "plain"

model Tiny(tokens: Tokens[B, T]) {
    x = embedding(tokens, vocab, d) as embed
    x = rms_norm(x) as norm
    logits = linear(x, vocab) as head
    return logits
}
"""

PAYLOAD = '__import__("os").system("touch PWNED")'
HOSTILE_NAMES = [
    f'""";{PAYLOAD};"""\\q.arch',
    f"''';{PAYLOAD};'''.arch",
    f'x.arch\n{PAYLOAD}\n#',
    f'x.arch\r{PAYLOAD}\r#',
    f'x.arch\u2028{PAYLOAD}\u2028#',
    f'x.arch\x0c{PAYLOAD}',
    f'\\\\""" + {PAYLOAD} + """.arch',
    f'{PAYLOAD}\\',
]
HOSTILE_STRINGS = [
    f'"""; {PAYLOAD}; """',
    f"\\\"\"\"; {PAYLOAD}",
    f"a\\nb\n{PAYLOAD}",
    "\\",
    "ends with a backslash \\",
]


def _assert_inert(source: str, cwd) -> None:
    ast.parse(source)
    namespace: dict = {}
    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(source, "<generated>", "exec"), namespace)
    finally:
        os.chdir(here)
    assert not (cwd / "PWNED").exists()
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "__import__"]
    assert not calls


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_stays_text(name, tmp_path):
    compiled = archc.compile(SPEC, name=name)
    _assert_inert(compiled.source, tmp_path)
    os.chdir(tmp_path)
    try:
        compiled.build()
    finally:
        os.chdir(ROOT)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("value", HOSTILE_STRINGS)
def test_hostile_string_parameter_stays_text(value, tmp_path):
    compiled = archc.compile(SPEC, overrides={"note": value})
    _assert_inert(compiled.source, tmp_path)
    # the same value written in the spec, as its grammar spells a string: "..." with backslash escapes
    literal = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    in_spec = archc.compile(SPEC.replace('"plain"', literal))
    assert in_spec.params["note"] == value
    _assert_inert(in_spec.source, tmp_path)


def test_cli_with_hostile_file_name(tmp_path):
    """`archc compile -o` on a file whose name is code: the output parses, imports, and runs nothing."""
    spec = tmp_path / '""";__import__("os").system("touch PWNED");"""'
    spec.mkdir()
    path = spec / "q.arch"
    path.write_text(SPEC)
    for bad in (path, tmp_path / 'n\n__import__("os").system("touch PWNED")\n#.arch'):
        if bad != path:
            bad.write_text(SPEC)
        out = tmp_path / "gen.py"
        result = subprocess.run([sys.executable, "-m", "archc", "compile", str(bad), "-o", str(out)],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        imported = subprocess.run([sys.executable, "-c", "import gen"], cwd=tmp_path, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
        assert imported.returncode == 0, imported.stderr
        assert not (tmp_path / "PWNED").exists()
