"""`archc eval SPEC --checkpoint DIR`: perplexity, surprisal, samples and pass@k of a trained run."""

from __future__ import annotations

from pathlib import Path

import torch

from archc.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_meta


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CheckpointError(f"{what}: expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CheckpointError(f"{what}: expected positive integers, got {text!r}")
    return values


def _setting(config: dict, key: str, default: int, low: int) -> int:
    """An integer setting of the run's config (in the checkpoint's meta.json), checked."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CheckpointError(f"the checkpoint's meta.json has config.{key} = {value!r}; expected an integer of at "
                              f"least {low} (the file was changed outside archc)")
    return value


def load_run(spec, checkpoint, options: dict, device="cpu", check_memory: bool = True):
    """Compile `spec` with the parameters a checkpoint was trained with, and load its weights."""
    import archc

    found = latest_checkpoint(checkpoint)
    if found is None:
        raise CheckpointError(f"no checkpoint at {checkpoint}; give a run directory written by `archc train`")
    meta = read_meta(found)
    params = {**meta.get("params", {}), **options.pop("overrides", {})}
    compiled = archc.compile(spec, params, **options)
    model = compiled.build(device=device, check_memory=check_memory)
    load_checkpoint(found, model, restore_rng=False,
                    expect={"spec_sha": compiled.ir.meta["sha256"], "params": compiled.params})
    model.eval()
    return compiled, model, meta


def run_eval(args, options: dict) -> int:
    from archc.training import data as data_mod
    from archc.training import synthetic
    from archc.training.evaluate import evaluate_reasoning, generate, perplexity, surprisal_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled, model, meta = load_run(Path(args.spec), args.checkpoint, options, device, args.memory_check)
    config = meta.get("config", {})
    tokenizer = data_mod.make_tokenizer(meta.get("tokenizer", "byte"))
    seq_len, batch = _setting(config, "seq_len", 256, 2), _setting(config, "batch_size", 8, 1)
    max_context = compiled.params.get("max_len")

    corpus = args.data or meta.get("data", "pydoc")
    dataset = data_mod.make_dataset(corpus, tokenizer, seed=_setting(config, "seed", 0, 0))
    data_mod.check_val(dataset)
    windows = list(data_mod.eval_windows(dataset.val, batch, seq_len, max_windows=args.batches))
    result = perplexity(model, windows, device=device)
    print(f"perplexity on {corpus} (validation split, {result.tokens:,} tokens): {result.perplexity:.3f} "
          f"(loss {result.loss:.4f} nats/token)")

    if args.surprisal and windows:
        print(f"\nmost confident mistakes (top {args.surprisal}):")
        for s in surprisal_report(model, windows[0][0], tokenizer.decode, top=args.surprisal, device=device):
            print(f"  pos {s.position:5d}  expected {s.expected!r} (p={s.expected_prob:.3f})  "
                  f"predicted {s.predicted!r} (p={s.predicted_prob:.3f})  after {s.context[-24:]!r}")

    if args.prompt is not None:
        new = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, max_context=max_context, seed=args.seed,
                       device=device)[0]
        print("\n" + args.prompt + tokenizer.decode(new))

    if args.pass_at_k:
        ks = _ints(args.k, "--k")
        if max(ks) > args.n:
            raise CheckpointError(f"--k {args.k}: every k must be at most --n {args.n}")
        problems = [synthetic.generate(args.seed * 1000 + i, depth, 2)
                    for depth in _ints(args.depths, "--depths") for i in range(args.problems)]
        rows = evaluate_reasoning(model, tokenizer, problems, args.n, ks, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, max_context=max_context, seed=args.seed,
                                  device=device)
        print(f"\npass@k on synthetic reasoning ({args.n} samples per problem):")
        print("  depth  problems  " + "  ".join(f"pass@{k:<3d}" for k in ks))
        for row in rows:
            print(f"  {row.depth:5d}  {row.problems:8d}  " + "  ".join(f"{row.pass_at[k]:8.3f}" for k in ks))
    return 0
