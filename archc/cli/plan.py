"""`archc plan`: rooflines, memory per device and parallelism plans of a spec on given hardware."""

from __future__ import annotations

from pathlib import Path

from archc.cli.options import compile_options, pairs
from archc.cli.output import emit
from archc.dsl.diagnostics import SpecError


def register(sub, common) -> None:
    p = sub.add_parser("plan", parents=[common],
                       help="per-op rooflines, memory per device, parallelism plans and inference bounds")
    p.add_argument("spec")
    p.add_argument("--hardware", required=True, metavar="NAME",
                   help="h100, h200, b200, v5e, v5p (archc/compiler/hardware.toml), or `local`: this machine, "
                        "measured now")
    p.add_argument("--devices", type=int, default=1, help="devices in all (default 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences per training step, all devices together")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (and the decoding context)")
    p.add_argument("--dtype", help="compute dtype: bf16 (default), fp16, fp8, fp32 (default for local)")
    p.add_argument("--decode-batch", type=int, metavar="N", help="sequences decoded together (default --batch)")
    p.add_argument("--inner-steps", type=int, default=50, metavar="H", help="DiLoCo's inner steps (default 50)")
    p.add_argument("--threads", type=int, metavar="N", help="with --hardware local on a CPU: torch threads")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of another symbolic dim")
    p.add_argument("--top", type=int, default=12, metavar="N", help="list the N costliest op kinds (default 12)")
    p.add_argument("-o", "--output", help="write the plan here (default: stdout)")
    p.set_defaults(run=_cmd_plan)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise SpecError(f"{flag}: expected a positive integer, got {value}")


def _cmd_plan(args) -> int:
    import archc
    from archc.compiler import hardware as known

    for flag in ("devices", "decode_batch", "inner_steps", "threads", "top"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    dims = {}
    for name, text in pairs(args.dim, "--dim").items():
        if not text.isdigit() or int(text) < 1:
            raise SpecError(f"--dim {name}: expected a positive integer, got {text!r}")
        dims[name] = int(text)
    hardware = None if args.hardware == "local" else known.load(args.hardware)  # a misspelt name fails first
    if hardware is None and args.devices > 1:
        raise SpecError(f"--devices {args.devices}: --hardware local is this one machine",
                        hint="name an accelerator (h100, v5p, ...) to plan for more devices")
    compiled = archc.compile(Path(args.spec), **compile_options(args))
    if hardware is None:
        from archc.training.hardware_probe import measure

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        hardware = measure(args.dtype or "fp32")
    result = compiled.plan(hardware, devices=args.devices, batch=args.batch, seq=args.seq,
                           dtype=args.dtype or ("fp32" if args.hardware == "local" else "bf16"), dims=dims or None,
                           inner_steps=args.inner_steps, decode_batch=args.decode_batch)

    emit(args, result.text(args.top))
    return 0
