"""The `archc` command line: compile | check | summary | graph | inspect | train | sweep | eval | convert |
sample.

Exit codes: 0 success, 1 a problem in a spec, an override or an input file,
2 bad usage, 3 an internal error (a bug: rerun with ARCHC_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from archc.cli.options import add_memory_option, at_least, compile_options, number, pairs
from archc.cli.output import emit, write_atomic
from archc.dsl.diagnostics import SpecError


def _compile(args, spec: str | None = None):
    import archc

    compiled = archc.compile(Path(spec or args.spec), **compile_options(args))  # a path, never spec text
    for warning in compiled.warnings:
        print(warning.render(), file=sys.stderr)
    if getattr(args, "dump_dir", None):
        write_atomic(Path(args.dump_dir) / "model.py", compiled.source)
    return compiled


def cmd_compile(args) -> int:
    compiled = _compile(args)
    emit(args, compiled.source)
    return 0


def cmd_check(args) -> int:
    for spec in args.specs:
        compiled = _compile(args, spec)
        print(f"{spec}: ok ({compiled.class_name}, {compiled.num_params():,} parameters)")
    return 0


def cmd_summary(args) -> int:
    dims = {k: _positive(v, f"--dim {k}") for k, v in pairs(args.dim, "--dim").items()}
    texts = []
    for spec in args.specs:
        compiled = _compile(args, spec)
        texts.append(f"# {spec}\n" + compiled.summary(args.batch, args.seq, args.depth, dims))
    emit(args, "\n".join(texts))
    return 0


def _positive(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"{what}: expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise SpecError(f"{what}: expected a positive integer, got {value}")
    return value


def cmd_graph(args) -> int:
    from archc.compiler.views import FORMATS

    compiled = _compile(args)
    graph = compiled.ir if not args.after else _stage(compiled, args.after)
    emit(args, FORMATS[args.format](graph))
    return 0


def _stage(compiled, name: str):
    try:
        return compiled.ir_after(name)
    except KeyError:
        from archc.dsl.diagnostics import did_you_mean
        names = [n for n, _g in compiled.stages]
        hint = did_you_mean(name, names) or f"stages: {', '.join(names)}"
        raise SpecError(f"--after {name}: no such stage", hint=hint) from None


def cmd_inspect(args) -> int:
    compiled = _compile(args)
    if args.what == "params":
        text = "".join(f"{k} = {v!r}\n" for k, v in compiled.params.items())
    elif args.what == "ir":
        text = (compiled.ir if not args.after else _stage(compiled, args.after)).to_text()
    elif args.what == "weights":
        from archc.interop.weights import fused_layout
        where = {name: f"  -> {fused}[{start}:{start + size}]" for fused, parts in fused_layout(compiled).items()
                 for name, start, size in parts}
        text = "".join(f"{k}: {list(v)}{where.get(k, '')}\n" for k, v in compiled.canonical_names().items())
    else:
        text = compiled.source
    emit(args, text)
    return 0


def _train_config(args):
    import attrs

    from archc.training.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in attrs.fields(TrainConfig)
              if getattr(args, f.name, None) is not None}
    return TrainConfig.from_dict(values)


def cmd_train(args) -> int:
    from archc.training.config import TrainError
    from archc.training.train import train

    options = compile_options(args)
    config = _train_config(args)
    diloco = ft = None
    if args.diloco is not None:
        from archc.training.distributed.diloco import parse_diloco
        diloco = parse_diloco(args.diloco)
    if args.fault_tolerant:
        from archc.training.distributed.ft import FTConfig
        ft = FTConfig(lighthouse=args.lighthouse, replica_id=args.replica_id)
    elif args.lighthouse or args.replica_id is not None:
        raise TrainError("--lighthouse and --replica-id go with --fault-tolerant")
    result = train(Path(args.spec), config, options.pop("overrides"), resume=args.resume, overwrite=args.overwrite,
                   nproc=args.nproc, diloco=diloco, fault_tolerant=ft, **options)
    if result is None:  # a process other than the lead of a distributed run
        return 0
    start = f"{result.initial_val_perplexity:.2f} -> " if result.initial_val_perplexity else ""
    val = f"val perplexity {start}{result.val_perplexity:.2f}, " if result.val_perplexity is not None else ""
    if not val and result.val_loss is not None:  # an objective without perplexity (diffusion)
        val = f"val loss {result.val_loss:.4f}, "
    images = (result.out_dir / "samples.png").exists()
    print(f"trained {result.steps} steps: train loss {result.final_loss:.4f}, {val}"
          f"{result.tokens_per_second:,.0f} {'images' if images else 'tokens'}/s, MFU {result.mfu:.0%}")
    shown = "samples.png" if images else "sample.txt"
    print(f"wrote {result.out_dir}/metrics.jsonl, loss.png, {shown}, checkpoints/")
    if result.sample:
        print("sample:\n" + result.sample)
    return 0


def cmd_sweep(args) -> int:
    from archc.training import sweep

    options = compile_options(args)
    points = sweep.run_sweep(Path(args.spec), args.multirun, _train_config(args), options.pop("overrides"),
                             overwrite=args.overwrite, **options)
    print(sweep.table(points), end="")
    return 0


def cmd_eval(args) -> int:
    from archc.cli.eval import run_eval

    return run_eval(args, compile_options(args))


def _add_train_options(p: argparse.ArgumentParser) -> None:
    import attrs

    from archc.training.config import TrainConfig

    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out-dir that holds an earlier run (deletes its checkpoints and metrics)")
    for field in attrs.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "str")
        if kind == "bool":
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {field.default})")
        else:
            conv = {"int": int, "float": float}.get(kind.split(" ")[0], str)
            if "float | None" in kind:
                conv = float
            p.add_argument(flag, dest=field.name, type=conv, default=None, help=f"(default {field.default})")


def kernel_help() -> str:
    """The kernels of every family the compiler chooses per layer, from the kernel registry."""
    from archc.kernels.registry import FAMILIES

    return ", ".join(f"{f.name} {'|'.join(f.choices)}" for f in FAMILIES.values() if f.per_layer)


def build_parser() -> argparse.ArgumentParser:
    from archc import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-D", dest="define", action="append", metavar="NAME=VALUE",
                        help="override a spec parameter (repeatable), e.g. -D d_model=512")
    common.add_argument("--kernel", action="append", metavar="PATTERN=KERNEL",
                        help="force a kernel for nodes whose path matches PATTERN (a glob; `attention`, `mixers` or "
                             "a mixer's name such as `kda` for all of them); kernels by family: " + kernel_help())
    common.add_argument("--no-pass", action="append", metavar="PASS", help="turn an optional pass off (repeatable)")
    common.add_argument("--print-ir-after", metavar="PASS|all", help="print the IR after a pass (or all) to stderr")
    common.add_argument("--dump-dir", metavar="DIR", help="write the IR after every stage and the module into DIR")

    parser = argparse.ArgumentParser(prog="archc", description="Compile .arch neural-network specs to PyTorch.")
    parser.add_argument("--version", action="version", version=f"archc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", parents=[common], help="generate the PyTorch module")
    p.add_argument("spec")
    p.add_argument("-o", "--output", help="write the module here (default: stdout)")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("check", parents=[common], help="parse, type- and shape-check specs")
    p.add_argument("specs", nargs="+", metavar="spec")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("summary", parents=[common], help="parameters, FLOPs and memory per block")
    p.add_argument("specs", nargs="+", metavar="spec")
    p.add_argument("--batch", type=at_least(1), default=1)
    p.add_argument("--seq", type=at_least(1), default=128)
    p.add_argument("--depth", type=at_least(0), default=1, help="how deep to list nested modules (0: totals only)")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of another symbolic dim")
    p.add_argument("-o", "--output")
    p.set_defaults(run=cmd_summary)

    p = sub.add_parser("graph", parents=[common], help="the IR as DOT, Mermaid or text (no Graphviz needed)")
    p.add_argument("spec")
    p.add_argument("--format", choices=("dot", "mermaid", "text"), default="text")
    p.add_argument("--after", metavar="PASS", help="show the IR after this stage (default: the final IR)")
    p.add_argument("-o", "--output")
    p.set_defaults(run=cmd_graph)

    p = sub.add_parser("inspect", parents=[common], help="show resolved parameters, IR, weights or code")
    p.add_argument("spec")
    p.add_argument("what", nargs="?", choices=("code", "ir", "params", "weights"), default="code")
    p.add_argument("--after", metavar="PASS", help="with `ir`: the IR after this stage")
    p.add_argument("-o", "--output")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("train", parents=[common], help="train a spec on its `loss` (text: next-token prediction)")
    p.add_argument("spec")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its newest whole checkpoint (with the same options; "
                        "--steps may grow)")
    p.add_argument("--nproc", type=at_least(1), metavar="N",
                   help="data-parallel FSDP2 over N gloo processes (same global batch); under torchrun: its group")
    p.add_argument("--diloco", metavar="KEY=VALUE,...",
                   help="DiLoCo, one process per replica: replicas=R,inner_steps=H[,outer_lr=0.7,"
                        "outer_momentum=0.9,streaming=FRAGMENTS,assign=strided|sequential,tau=T,alpha=A,"
                        "fp4=e3m0|e2m1,block=128]")
    p.add_argument("--fault-tolerant", action="store_true",
                   help="each DiLoCo replica (with --diloco) or each of --nproc R data-parallel processes is "
                        "a torchft replica group; a killed one is restarted and heals from a live peer while "
                        "the others keep going")
    p.add_argument("--lighthouse", metavar="URL",
                   help="with --fault-tolerant: the torchft lighthouse to join (default: start one here)")
    p.add_argument("--replica-id", type=at_least(0), metavar="I",
                   help="with --fault-tolerant --lighthouse: run only replica group I in this process")
    _add_train_options(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("sweep", parents=[common], help="train a grid of parameter values briefly and compare")
    p.add_argument("spec")
    p.add_argument("-m", dest="multirun", action="append", required=True, metavar="NAME=A,B,...",
                   help="an axis of the grid: values, or range(a,b[,step]) (repeatable)")
    _add_train_options(p)
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("eval", parents=[common], help="perplexity, surprisal, samples and pass@k of a checkpoint")
    p.add_argument("spec")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or one checkpoint in it")
    p.add_argument("--data", help="corpus for perplexity (default: the run's validation split)")
    p.add_argument("--batches", type=at_least(1), default=32, help="evaluation windows (batches) for perplexity")
    p.add_argument("--surprisal", type=at_least(0), default=10, metavar="N",
                   help="list the N most confident mistakes")
    p.add_argument("--prompt", help="generate a continuation of this text")
    p.add_argument("--max-new-tokens", type=at_least(0), default=200)
    p.add_argument("--temperature", type=number(0.0, why=" (0: greedy)"), default=0.8)
    p.add_argument("--top-k", type=at_least(1), help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=number(0.0, 1.0, low_open=True), help="nucleus sampling: the smallest set of "
                   "tokens holding this much probability")
    p.add_argument("--pass-at-k", action="store_true", help="score the synthetic reasoning tasks")
    p.add_argument("--n", type=at_least(1), default=8, help="samples per problem for pass@k")
    p.add_argument("--k", default="1,4,8", help="comma list of k (each <= n)")
    p.add_argument("--problems", type=at_least(1), default=10, help="problems per depth")
    p.add_argument("--depths", default="1,2,3", help="comma list of problem depths")
    p.add_argument("--seed", type=at_least(0, 2**63), default=0)
    add_memory_option(p)
    p.set_defaults(run=cmd_eval)

    from archc.cli.convert import register as register_convert

    register_convert(sub, common)
    from archc.cli.export import register as register_export

    register_export(sub, common)
    from archc.cli.plan import register as register_plan

    register_plan(sub, common)
    from archc.cli.sample import register as register_sample

    register_sample(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch", 1) <= 0 or getattr(args, "seq", 1) <= 0:
        parser.error("--batch and --seq must be positive")
    try:
        return args.run(args)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # a bug in archc, not in the spec
        if isinstance(err, _user_errors()):
            print(f"error: {err}", file=sys.stderr)
            return 1
        if os.environ.get("ARCHC_DEBUG"):
            traceback.print_exc()
        else:
            print(f"internal error: {type(err).__name__}: {err}\n"
                  "This is a bug in archc; rerun with ARCHC_DEBUG=1 for the traceback.", file=sys.stderr)
        return 3


def _user_errors() -> tuple[type, ...]:
    """Exceptions that describe a problem with the user's input, shown as one line."""
    from archc.compiler.resources import ResourceError
    from archc.interop.weights import WeightsError
    from archc.training.checkpoint import CheckpointError
    from archc.training.config import TrainError
    from archc.training.data import DataError
    from archc.training.distributed.diloco import DiLoCoError
    from archc.training.optim import OptimizerError

    return (WeightsError, CheckpointError, DataError, OptimizerError, TrainError, DiLoCoError, ResourceError, OSError)


if __name__ == "__main__":
    sys.exit(main())
