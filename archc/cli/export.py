"""`archc export SPEC OUT_DIR --checkpoint DIR|FILE --to hf`: a trained or converted model as a Hugging
Face checkpoint (config.json + model.safetensors) that transformers loads, the weight map run backwards."""

from __future__ import annotations

import sys
from pathlib import Path

from archc.cli.convert import add_map_options, chosen_map
from archc.cli.options import add_memory_option, compile_options
from archc.dsl.diagnostics import SpecError
from archc.interop.hf import ARCHS, load_converted, read_config, save_hf


def register(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="write a model as a Hugging Face checkpoint")
    p.add_argument("spec")
    p.add_argument("out", metavar="OUT_DIR", help="where config.json and model.safetensors are written")
    p.add_argument("--checkpoint", required=True, metavar="DIR|FILE",
                   help="a run directory (or one checkpoint in it) from `archc train`, or a weights file from "
                        "`archc convert`")
    p.add_argument("--to", choices=("hf",), default="hf", help="the format: hf, transformers' directory layout")
    add_map_options(p, "default: the family a converted file came from")
    p.add_argument("--config-from", metavar="DIR",
                   help="take the config.json fields the map does not write (token ids, max_position_embeddings) "
                        "from this Hugging Face directory, e.g. the one the weights were converted from")
    add_memory_option(p)
    p.set_defaults(run=_cmd_export)


def _cmd_export(args) -> int:
    options = compile_options(args)
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_file():
        compiled, model, model_type = load_converted(args.spec, checkpoint, options.pop("overrides"), options,
                                                     args.memory_check)
    else:
        from archc.cli.eval import load_run

        compiled, model, _meta = load_run(Path(args.spec), checkpoint, options, check_memory=args.memory_check)
        model_type = None
    wmap = chosen_map(args) or model_type
    if wmap is None:
        raise SpecError(f"{args.checkpoint} does not say which Hugging Face family it is: pass --arch or --map",
                        hint=f"built-in: {', '.join(ARCHS)}")
    base = read_config(args.config_from) if args.config_from else None
    config = save_hf(compiled, model, args.out, wmap, base_config=base)
    print(f"wrote {args.out}: config.json ({config['model_type']}, {config['architectures'][0]}) and "
          f"model.safetensors ({compiled.num_params():,} parameters)", file=sys.stderr)
    return 0
