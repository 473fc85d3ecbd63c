"""`archc convert`: a Hugging Face checkpoint into a spec's weights."""

from __future__ import annotations

import sys
from pathlib import Path

from archc.cli.options import add_memory_option, compile_options
from archc.interop.hf import ARCHS, load_for_convert, save_converted


def add_map_options(p, what: str) -> None:
    """--arch NAME (a built-in map) or --map FILE (a map of your own), shared by convert and export."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--arch", choices=sorted(ARCHS), help=f"the built-in weight map to use ({what})")
    group.add_argument("--map", metavar="FILE.py",
                       help="a weight map of your own: a Python file defining MAP (it runs; pass only files you "
                            "trust)")


def chosen_map(args):
    return Path(args.map) if args.map else args.arch


def register(sub, common) -> None:
    p = sub.add_parser("convert", parents=[common], help="convert a Hugging Face checkpoint to this spec's weights")
    p.add_argument("spec")
    p.add_argument("--from-hf", required=True, metavar="DIR", help="a directory with config.json and model.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    add_map_options(p, "default: the checkpoint's model_type")
    add_memory_option(p)
    p.set_defaults(run=_cmd_convert)


def _cmd_convert(args) -> int:
    compile_kw = compile_options(args)
    overrides = compile_kw.pop("overrides")
    loaded = load_for_convert(args.spec, args.from_hf, chosen_map(args), overrides, compile_kw, args.memory_check)
    save_converted(loaded.model, loaded.compiled, Path(args.output), loaded.wmap.model_type)
    params = " ".join(f"{k}={v!r}" for k, v in {**loaded.derived, **overrides}.items())
    print(f"{args.from_hf}: {loaded.arch} ({loaded.wmap.origin} map), {loaded.n_hf_tensors} tensors; {params}\n"
          f"all weights matched ({loaded.compiled.num_params():,} parameters)\n"
          f"wrote {args.output}", file=sys.stderr)
    return 0
