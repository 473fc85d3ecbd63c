"""What generated gated paths (`gated(x, branches=[...], ...)`) call, besides the experts' routing.

A gated layer runs several branch blocks and combines them per token by a learned gate read from
the layer's input `x` [B, T, D]:

- `mode="mix"`: every branch runs on every token; the output is Σ_b g_b · y_b with
  `g = gate(x)` of `branches · heads` logits laid out [heads, branches] (NSA's and FLA's layout),
  turned into weights by `branch_gates`: `softmax` over the branches (the weights sum to 1) or
  an independent `sigmoid` per branch (NSA). With `heads` > 1 each branch output [..., heads·K]
  is weighted head by head.
- `mode="select"`: an `archc.runtime.moe.Router` (the experts' own: top-k, balance losses, load
  statistics, the aux-free bias update) sends each token to `top_k` branches, and only those
  branches' outputs for it are kept, weighted by the router's gates. A branch declared on rows,
  `Tensor[N, D]`, runs on its routed rows only (the experts' sparse dispatch). A branch declared
  on sequences, `Tensor[B, T, D]` — a sequence mixer, which needs every token as keys, values or
  recurrent state — runs on the whole sequence, and `routed_rows` keeps the outputs of the tokens
  routed to it, in the router's expert-sorted row order, so `combine_rows` sums them like experts'.
"""

from __future__ import annotations

import torch

from archc.runtime.moe import Routing

GATES = ("softmax", "sigmoid")

__all__ = ["GATES", "branch_gates", "mix_branches", "routed_rows"]


def branch_gates(logits: torch.Tensor, branches: int, kind: str) -> torch.Tensor:
    """[..., heads·branches] gate logits -> [..., heads, branches] weights (softmax over the branches, in fp32 at
    least, or a sigmoid each)."""
    if kind not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {kind!r}")
    g = logits.unflatten(-1, (-1, branches))
    if kind == "sigmoid":
        return torch.sigmoid(g)
    return torch.softmax(g, dim=-1, dtype=torch.promote_types(g.dtype, torch.float32)).to(g.dtype)


def mix_branches(outputs: list[torch.Tensor], gates: torch.Tensor) -> torch.Tensor:
    """Σ_b gates[..., h, b] · outputs[b][..., h·K]: each branch output weighted per token and head."""
    heads = gates.shape[-2]
    total = None
    for b, y in enumerate(outputs):
        term = (y.unflatten(-1, (heads, -1)) * gates[..., b, None]).flatten(-2)
        total = term if total is None else total + term
    return total


def routed_rows(y: torch.Tensor, routing: Routing, branch: int) -> torch.Tensor:
    """The rows of the tokens routed to `branch`, from its output over the whole sequence [B, T, D'], in the
    router's sorted row order: [rows of branch, D']."""
    start = int(routing.counts[:branch].sum())
    slots = routing.order[start:start + int(routing.counts[branch])]
    return y.reshape(-1, y.shape[-1])[slots // routing.top_k]
