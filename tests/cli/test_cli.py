"""The command line, end to end through `archc.cli.main`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import BUILT_SPECS, ROOT, SPECS

from archc.cli import main

LLAMA = str(SPECS / "llama.arch")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_to_stdout_and_file(capsys, tmp_path):
    code, out, _err = run(capsys, "compile", LLAMA, "-D", "n_layers=2")
    assert code == 0 and "class Llama(nn.Module):" in out
    target = tmp_path / "gen" / "llama.py"
    code, _out, err = run(capsys, "compile", LLAMA, "-o", str(target))
    assert code == 0 and target.read_text().startswith('"""Llama')
    namespace: dict = {}
    exec(compile(target.read_text(), str(target), "exec"), namespace)
    assert "Llama" in namespace


def test_check_many_specs(capsys):
    code, out, _err = run(capsys, "check", *(str(p) for p in BUILT_SPECS))
    assert code == 0 and out.count(": ok (") == len(BUILT_SPECS)


def test_summary_table_has_totals_and_scales_with_seq(capsys):
    code, out, _err = run(capsys, "summary", LLAMA, "--batch", "2", "--seq", "64")
    assert code == 0
    assert "layers.0" in out and "DecoderLayer" in out and "total params" in out
    flops_64 = next(line for line in out.splitlines() if line.startswith("forward FLOPs"))
    _code, out, _err = run(capsys, "summary", LLAMA, "--batch", "2", "--seq", "128")
    flops_128 = next(line for line in out.splitlines() if line.startswith("forward FLOPs"))
    assert flops_64 != flops_128


@pytest.mark.parametrize("fmt,marker", [("dot", "digraph"), ("mermaid", "flowchart TD"), ("text", "%n0")])
def test_graph_formats(capsys, fmt, marker):
    code, out, _err = run(capsys, "graph", LLAMA, "--format", fmt)
    assert code == 0 and marker in out and "attn" in out


def test_print_ir_after_and_dump_dir(capsys, tmp_path):
    code, _out, err = run(capsys, "compile", LLAMA, "--print-ir-after", "cse", "--dump-dir", str(tmp_path))
    assert code == 0
    assert err.count("IR Dump After") == 1 and "IR Dump After cse" in err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "00-lower.ir" and "07-choose_kernels.ir" in names and "model.py" in names
    code, _out, err = run(capsys, "compile", LLAMA, "--print-ir-after", "all")
    assert err.count("IR Dump After") == 8
    code, _out, err = run(capsys, "compile", LLAMA, "--print-ir-after", "csee")
    assert code == 1 and "did you mean `cse`" in err


def test_inspect_views(capsys):
    for what, marker in (("params", "d_model = 128"), ("ir", "attention_core"), ("weights", "layers.0.attn.q.weight"),
                         ("code", "class DecoderLayer")):
        code, out, _err = run(capsys, "inspect", LLAMA, what)
        assert code == 0 and marker in out, what
    code, out, _err = run(capsys, "inspect", LLAMA, "ir", "--after", "lower")
    assert "<unfolded>" in out  # before fold_params


def test_no_pass_and_kernel_override(capsys):
    code, out, _err = run(capsys, "compile", LLAMA, "--no-pass", "fuse_projections", "--kernel", "attention=math")
    assert code == 0 and "qkv" not in out and "AF.attention_math" in out
    code, _out, err = run(capsys, "compile", LLAMA, "--kernel", "attention=flash9")
    assert code == 1 and "unknown kernel" in err


def test_spec_errors_exit_1_without_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.arch"
    bad.write_text("model M(tokens: Tokens[B, T]) {\n  x = embeding(tokens, 4, 4)\n  return x\n}\n")
    code, _out, err = run(capsys, "compile", str(bad))
    assert code == 1 and "Traceback" not in err
    assert "bad.arch:2:7" in err and "did you mean `embedding`" in err
    code, _out, err = run(capsys, "compile", str(tmp_path / "missing.arch"))
    assert code == 1 and "no such spec file" in err
    code, _out, err = run(capsys, "compile", LLAMA, "-D", "d_model")
    assert code == 1 and "expected -D name=value" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["summary", LLAMA, "--seq", "0"])
    assert exc.value.code == 2


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "archc", "check", LLAMA], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout


def test_kernel_help_lists_every_face_from_the_kernel_registry():
    from archc.cli.main import build_parser
    from archc.kernels.registry import FAMILIES

    compile_cmd = build_parser()._subparsers._group_actions[0].choices["compile"]
    text = " ".join(compile_cmd.format_help().split())
    for family in FAMILIES.values():
        if family.per_layer:
            assert f"{family.name} {'|'.join(family.choices)}" in text
