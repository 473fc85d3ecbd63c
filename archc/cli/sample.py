"""`archc sample SPEC --checkpoint DIR`: a grid of images drawn from a trained diffusion spec."""

from __future__ import annotations

from pathlib import Path

import torch

from archc.cli.options import add_memory_option, at_least, compile_options, number
from archc.runtime.samplers import SAMPLERS
from archc.training.config import TrainError


def register(sub, common) -> None:
    p = sub.add_parser("sample", parents=[common], help="draw a grid of images from a trained diffusion spec")
    p.add_argument("spec")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or one checkpoint in it")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="ddpm or ddim (default) for eps / x0 / v objectives, euler (default) or heun for flow")
    p.add_argument("--steps", type=at_least(1), default=50, help="sampling steps")
    p.add_argument("--cfg", type=number(0.0), default=1.0, metavar="SCALE",
                   help="classifier-free guidance scale (1: the conditional prediction alone)")
    p.add_argument("--label", type=at_least(0), metavar="ID",
                   help="the class to draw (default: every class in turn)")
    p.add_argument("--prompt", metavar="TEXT",
                   help='the caption to draw, for a caption spec (digit pairs: "three and seven")')
    p.add_argument("--count", type=at_least(1), default=16, help="how many images")
    p.add_argument("--seed", type=at_least(0, 2**63), default=0, help="the same seed gives the same images")
    p.add_argument("-o", "--output", required=True, metavar="GRID.png")
    add_memory_option(p)
    p.set_defaults(run=_cmd_sample)


def _cmd_sample(args) -> int:
    from archc.cli.eval import load_run
    from archc.training.image_source import diffusion_spec, generate, write_grid

    if not args.output.lower().endswith(".png"):
        raise TrainError(f"-o {args.output}: the grid is written as PNG; name a .png file")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled, model, _meta = load_run(Path(args.spec), args.checkpoint, compile_options(args), device,
                                      args.memory_check)
    spec = diffusion_spec(compiled)
    if spec is None:
        raise TrainError(f"{args.spec} is not a diffusion spec: it has no `add_noise` of an Image input")
    labels = None
    if args.prompt is not None and not spec.caption:
        raise TrainError(f"--prompt: {args.spec} is not conditioned on a caption"
                         + (" (it takes a class: --label)" if spec.label is not None else ""))
    if spec.caption:
        labels = spec.captions(_prompts(args))
    elif spec.label is not None:
        classes = spec.null_label
        if args.label is not None and classes is not None and args.label >= classes:
            raise TrainError(f"--label {args.label}: the spec has {classes} classes (0 … {classes - 1})")
        labels = (torch.full((args.count,), args.label) if args.label is not None
                  else torch.arange(args.count) % (classes or args.count))
    elif args.label is not None:
        raise TrainError(f"--label: {args.spec} is not conditioned on a label")
    images = generate(model, spec, labels, count=args.count, sampler=args.sampler, steps=args.steps,
                      cfg_scale=args.cfg, seed=args.seed, device=device)
    write_grid(images, Path(args.output))
    print(f"wrote {args.output}: {args.count} images, {args.sampler or 'default'} sampler, {args.steps} steps, "
          f"guidance {args.cfg:g}, seed {args.seed}")
    return 0


def _prompts(args) -> list[str]:
    """The captions to draw: --prompt, or the digit pair --label names (10·left + right), or a spread of pairs."""
    from archc.training.image_source import PROMPT_PAIRS
    from archc.training.images import pair_caption

    if args.prompt is not None:
        if args.label is not None:
            raise TrainError("give --prompt or --label, not both")
        return [args.prompt] * args.count
    if args.label is not None:
        if args.label >= 100:
            raise TrainError(f"--label {args.label}: a digit pair is 10·left + right, 0 … 99")
        return [pair_caption(*divmod(args.label, 10))] * args.count
    return [pair_caption(*PROMPT_PAIRS[i % len(PROMPT_PAIRS)]) for i in range(args.count)]
