"""`archc convert`: a Hugging Face checkpoint into a spec's weights."""

from __future__ import annotations

import sys
from pathlib import Path

from archc.cli.options import compile_options
from archc.interop.hf import ARCHS, load_for_convert, save_converted


def register(sub, common) -> None:
    p = sub.add_parser("convert", parents=[common], help="convert a Hugging Face checkpoint to this spec's weights")
    p.add_argument("spec")
    p.add_argument("--from-hf", required=True, metavar="DIR", help="a directory with config.json and model.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    p.add_argument("--arch", choices=sorted(ARCHS), help="the checkpoint's architecture (default: its model_type)")
    p.set_defaults(run=_cmd_convert)


def _cmd_convert(args) -> int:
    compile_kw = compile_options(args)
    overrides = compile_kw.pop("overrides")
    loaded = load_for_convert(args.spec, args.from_hf, args.arch, overrides, compile_kw)
    save_converted(loaded.model, loaded.compiled, Path(args.output))
    params = " ".join(f"{k}={v!r}" for k, v in {**loaded.derived, **overrides}.items())
    print(f"{args.from_hf}: {loaded.arch}, {loaded.n_hf_tensors} tensors; {params}\n"
          f"all weights matched ({loaded.compiled.num_params():,} parameters)\n"
          f"wrote {args.output}", file=sys.stderr)
    return 0
