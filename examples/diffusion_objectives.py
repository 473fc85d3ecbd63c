"""DiT on the built-in digits with three objectives — ε-prediction, v-prediction (both on the linear DDPM
schedule) and flow matching (SD3's rectified flow) — trained for the same steps by the one training loop,
then judged without looking: conditional samples at guidance 1 and 3, scored by a small classifier
trained on the same digits (label accuracy, and Fréchet distance to the validation images in its
feature space; archc/training/image_eval.py). Writes a table and one grid of samples. Run:

    PYTHONPATH=. .venv/bin/python examples/diffusion_objectives.py     # ~15 minutes on two busy CPU cores

Each objective is the spec's parameter `objective` (specs/dit.arch); everything else is equal: seed,
data order, steps, optimiser. Samplers: DDIM for ε and v, Euler for flow, `--sample-steps` steps. One
torch thread: on a shared machine more threads wait on each other (image_eval.py measured 4x).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from archc.cli.eval import load_run
from archc.training.image_eval import image_frechet_distance, label_accuracy, train_classifier
from archc.training.image_source import diffusion_spec, generate, write_grid
from archc.training.images import make_image_data
from archc.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "dit.arch"
OBJECTIVES = {"eps": "ε (DDPM, linear)", "v": "v (DDPM, linear)", "flow": "flow matching (SD3)"}
SCALES = (1.0, 3.0)


def main(steps: int = 1500, per_class: int = 20, sample_steps: int = 50, out: str = "runs/objectives",
         grid: Path = ROOT / "docs" / "images" / "dit_samples.png") -> list[tuple]:
    train_set, val = make_image_data("digits")
    judge = train_classifier(train_set)
    labels = torch.arange(10).repeat(per_class)
    rows, grid_rows = [], []
    for objective, name in OBJECTIVES.items():
        config = TrainConfig(steps=steps, batch_size=128, lr=2e-3, eval_every=steps, checkpoint_every=steps,
                             progress=False, out_dir=f"{out}/{objective}")
        start = time.perf_counter()
        result = train(SPEC, config, {"objective": objective}, overwrite=True)
        seconds = time.perf_counter() - start
        compiled, model, _meta = load_run(SPEC, result.out_dir, {})
        spec = diffusion_spec(compiled)
        for scale in SCALES:
            images = generate(model, spec, labels, steps=sample_steps, cfg_scale=scale, seed=0)
            accuracy = label_accuracy(judge, images, labels)
            frechet = image_frechet_distance(judge, val.images, images)
            rows.append((name, scale, result.val_loss, accuracy, frechet, seconds))
            grid_rows.append(images[:10])  # one of each digit, 0 … 9
            print(f"{name:22s} cfg {scale:g}  val loss {result.val_loss:.4f}  accuracy {accuracy:6.1%}  "
                  f"Fréchet {frechet:7.2f}  ({seconds:.0f} s training)", flush=True)
    write_grid(torch.cat(grid_rows), grid, columns=10)
    print(f"\n{steps} steps each, batch 128, {10 * per_class} samples per row, {sample_steps} DDIM / Euler steps; "
          f"grid: {grid.relative_to(ROOT) if grid.is_relative_to(ROOT) else grid}\n")
    print("| objective | CFG | val loss | label accuracy | Fréchet distance |")
    print("|---|---|---|---|---|")
    for name, scale, loss, accuracy, frechet, _ in rows:
        print(f"| {name} | {scale:g} | {loss:.4f} | {accuracy:.1%} | {frechet:.1f} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each objective")
    parser.add_argument("--per-class", type=int, default=20, help="samples of each digit per row")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--out", default="runs/objectives")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(args.steps, args.per_class, args.sample_steps, args.out)
