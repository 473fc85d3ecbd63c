"""Mixture-of-experts routing: routers, balance losses, capacity, and the bias update.

Generated MoE modules call a `Router` for a `Routing` (which experts each
token goes to, with what weight, in expert-sorted order), run the experts on
the sorted rows (a per-expert loop, or grouped GEMMs after `fuse_experts`),
and combine. Equations follow docs/algorithms.md §1:

- `softmax`: Shazeer top-k gating, softmax over the kept top-k logits (the
  same as renormalising the top-k of a softmax over all experts), with
  optional noisy gating (`noisy=true`: learned softplus noise scale, training
  only) and the importance and load losses w·CV² (load through the normal
  CDF when noisy, else assignment counts).
- `switch`: softmax probabilities in fp32, top-1 (or top-k), gate = the
  chosen probability; auxiliary loss α·E·Σ f_i P_i; optional router z-loss;
  capacity C = ceil(k·N/E·capacity_factor), first choices admitted before
  second choices, in token order. Dropped assignments keep their row (so
  every group has its rows) but get weight 0: their tokens pass through the
  residual only.
- `deepseek_v3`: sigmoid affinities; selection by affinity + a per-expert
  bias that takes no gradient; group-limited selection (top `top_groups` of
  `groups` by the sum of each group's two best biased scores); gates are the
  unbiased affinities of the chosen experts, renormalised and scaled by
  `route_scale`. Balanced without auxiliary loss: after each optimizer step
  `update_expert_biases` moves each bias by ±γ toward the mean load (counts
  summed over data-parallel ranks); the optional sequence-wise loss
  α·Σ f_i P_i uses the actual selection mask.

`norm_topk_prob` overrides whether the chosen gates are renormalised to sum
to 1: `false` on `softmax` keeps the top-k of the softmax over all experts as
they are (Qwen2-MoE, OLMoE), `true` on `switch` renormalises its top-k
probabilities, `false` on `deepseek_v3` scales the raw affinities.

All losses are exactly their weight under perfect balance.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from archc.kernels.grouped_gemm import combine, dispatch, gather_sorted

ROUTER_KINDS = ("softmax", "switch", "deepseek_v3")
BALANCE_RULES = ("aux_loss", "aux_free", "seq_aux", "none")


@attrs.define(eq=False)
class Routing:
    """Where tokens go. N tokens, k slots, E experts; rows are (token, slot) pairs sorted by expert."""

    experts: torch.Tensor  # [N, k] chosen expert of each slot
    weights: torch.Tensor  # [N, k] gate values (0 for a dropped assignment)
    order: torch.Tensor  # [N*k] sorted row -> flat (token, slot) index
    counts: torch.Tensor  # [E] rows per expert
    inverse: torch.Tensor  # [N, k] sorted row of each assignment
    kept: torch.Tensor  # [N, k] bool: admitted under the capacity

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    def split_sizes(self) -> list[int]:
        """Rows per expert as Python ints (a host read; the per-expert loop needs it)."""
        return self.counts.tolist()


def dispatch_rows(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[N, D] tokens -> [N*k, D] rows sorted by expert."""
    return gather_sorted(x, routing.order, routing.top_k)


def combine_rows(y: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[N*k, D] expert outputs -> [N, D], each token the gate-weighted sum of its rows."""
    return combine(y, routing.order, routing.weights, routing.experts.shape[0], inverse=routing.inverse)


class Router(nn.Module):
    """Scores tokens against experts and picks top-k; keeps its aux loss and load statistics."""

    def __init__(self, dim: int, num_experts: int, top_k: int, kind: str = "softmax", *, balance: str = "aux_loss",
                 aux_weight: float = 0.01, z_loss_weight: float = 0.0, capacity_factor: float = 0.0,
                 noisy: bool = False, groups: int = 1, top_groups: int = 1, route_scale: float = 1.0,
                 bias_rate: float = 1e-3, norm_topk_prob: bool | None = None) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS or balance not in BALANCE_RULES:
            raise ValueError(f"router {kind!r} / balance {balance!r}: choose from {ROUTER_KINDS} / {BALANCE_RULES}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
        if num_experts % groups or not 1 <= top_groups <= groups:
            raise ValueError(f"groups={groups} must divide {num_experts} experts and top_groups <= groups")
        self.num_experts, self.top_k, self.kind, self.balance = num_experts, top_k, kind, balance
        self.aux_weight, self.z_loss_weight, self.capacity_factor = aux_weight, z_loss_weight, capacity_factor
        self.noisy, self.groups, self.top_groups, self.route_scale = noisy, groups, top_groups, route_scale
        self.bias_rate = bias_rate
        # Whether the chosen gates are renormalised: by default all but switch's are.
        self.norm_topk_prob = kind != "switch" if norm_topk_prob is None else norm_topk_prob
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.noise = nn.Linear(dim, num_experts, bias=False) if noisy else None
        if balance == "aux_free":
            # Selection bias: a buffer, so no optimizer ever touches it; saved with the weights.
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            self.register_buffer("load", torch.zeros(num_experts), persistent=False)
        self.aux_loss = torch.zeros(())
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # counts, kept, aux

    @property
    def stats(self) -> dict[str, float | list[int]]:
        """Expert-load histogram, max/mean load, dropped fraction and aux loss of the last forward.

        Computed when read, from tensors the forward kept: reading them in the forward would
        cost a device->host sync per router per step, stalling the launch queue on GPUs."""
        if self._last is None:
            return {}
        counts, kept, aux = self._last
        loads = counts.float()
        return {"load": counts.tolist(), "max_over_mean_load": (loads.max() / loads.mean().clamp_min(1e-9)).item(),
                "dropped_fraction": 1.0 - kept.float().mean().item(), "aux_loss": float(aux)}

    def extra_repr(self) -> str:
        renorm = "" if self.norm_topk_prob == (self.kind != "switch") else f", norm_topk_prob={self.norm_topk_prob}"
        return f"{self.kind}, experts={self.num_experts}, top_k={self.top_k}, balance={self.balance}{renorm}"

    def forward(self, x: torch.Tensor, seq_len: int | None = None) -> Routing:
        """x: [N, D] tokens (N = B·T; `seq_len` = T for the sequence-wise loss)."""
        logits = self.gate(x).float()
        aux = logits.new_zeros(())
        if self.kind == "deepseek_v3":
            experts, weights, scores = self._deepseek(logits)
        else:
            experts, weights, scores, aux = self._softmax(x, logits)
        kept = self._capacity(experts) if self.capacity_factor > 0 else torch.ones_like(experts, dtype=torch.bool)
        weights = weights * kept
        if self.z_loss_weight:
            aux = aux + self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        if self.balance == "seq_aux":
            seq_aux = sequence_balance_loss(scores, experts, self.num_experts, seq_len or x.shape[0])
            aux = aux + self.aux_weight * seq_aux
        order, counts, inverse = dispatch(experts, self.num_experts)
        if self.balance == "aux_free" and self.training:
            with torch.no_grad():  # dropped assignments add 0 (a boolean-mask index would sync on GPUs)
                self.load.scatter_add_(0, experts.reshape(-1), kept.reshape(-1).to(self.load.dtype))
        self.aux_loss = aux
        self._last = (counts, kept.detach(), aux.detach())
        return Routing(experts, weights.to(x.dtype), order, counts, inverse, kept)

    def _softmax(self, x, logits):
        clean = logits
        if self.noisy and self.training:
            std = F.softplus(self.noise(x).float())
            logits = clean + torch.randn_like(clean) * std
        if self.kind == "switch":
            probs = torch.softmax(logits, dim=-1)
            weights, experts = probs.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            aux = logits.new_zeros(())
            if self.balance == "aux_loss":
                aux = self.aux_weight * switch_balance_loss(probs, experts, self.num_experts)
            return experts, weights, probs, aux
        if self.norm_topk_prob:
            top, experts = logits.topk(self.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        else:  # the top-k of the softmax over all experts, as they are
            weights, experts = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        aux = logits.new_zeros(())
        gates = torch.zeros_like(logits).scatter(-1, experts, weights)
        if self.balance == "aux_loss":
            importance = gates.sum(0)
            if self.noisy and self.training:
                load = noisy_load(clean, logits, std, self.top_k)
            else:
                load = (gates > 0).float().sum(0)
            aux = self.aux_weight * (cv_squared(importance) + cv_squared(load))
        return experts, weights, torch.softmax(clean, dim=-1), aux

    def _deepseek(self, logits):
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias if self.balance == "aux_free" else scores
        if self.groups > 1:
            grouped = biased.view(-1, self.groups, self.num_experts // self.groups)
            per_group = (grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
                         if self.balance == "aux_free" else grouped.max(dim=-1).values)
            keep = per_group.topk(self.top_groups, dim=-1).indices
            mask = torch.ones_like(per_group, dtype=torch.bool).scatter(-1, keep, False)
            biased = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view_as(biased)
        experts = biased.topk(self.top_k, dim=-1).indices
        chosen = scores.gather(-1, experts)
        weights = (chosen / chosen.sum(-1, keepdim=True) if self.norm_topk_prob else chosen) * self.route_scale
        return experts, weights, scores

    def _capacity(self, experts: torch.Tensor) -> torch.Tensor:
        """Admit assignments in priority order (all first choices, then second ...) up to C per expert."""
        n, k = experts.shape
        capacity = math.ceil(k * n / self.num_experts * self.capacity_factor)
        onehot = F.one_hot(experts.t().reshape(-1), self.num_experts)  # slot-major: priority order
        position = onehot.cumsum(0) - 1
        kept = (position * onehot).sum(-1) < capacity
        return kept.view(k, n).t()


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, 0 for a single expert."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var(unbiased=False) / (x.float().mean().square() + 1e-10)


def noisy_load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer's smooth load: P(expert i stays in the top-k under fresh noise), summed over tokens."""
    top = noisy.topk(min(k + 1, noisy.shape[-1]), dim=-1).values
    threshold_in = top[:, k - 1:k] if top.shape[-1] > k else top[:, -1:]
    threshold_out = top[:, k:k + 1] if top.shape[-1] > k else top[:, -1:]
    is_in = noisy > threshold_in
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_in = normal.cdf((clean - threshold_in) / std.clamp_min(1e-9))
    prob_out = normal.cdf((clean - threshold_out) / std.clamp_min(1e-9))
    return torch.where(is_in, prob_in, prob_out).sum(0)


def switch_balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E·Σ_i f_i P_i with f_i the fraction of assignments to expert i (over all k slots)."""
    f = F.one_hot(experts, num_experts).float().sum(1).mean(0) / experts.shape[1]
    p = probs.mean(0)
    return num_experts * (f * p).sum()


def sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor, num_experts: int, seq_len: int
                          ) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise loss Σ_i f_i P_i per sequence, averaged over sequences."""
    k = experts.shape[1]
    mask = F.one_hot(experts, num_experts).float().sum(1).view(-1, seq_len, num_experts)
    f = mask.sum(1) * num_experts / (k * seq_len)
    normed = (scores / scores.sum(-1, keepdim=True)).view(-1, seq_len, num_experts)
    return (f * normed.mean(1)).sum(-1).mean()


def routers(model: nn.Module) -> list[tuple[str, Router]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the routers' auxiliary losses from the last forward (0.0 without routers)."""
    losses = [r.aux_loss for _name, r in routers(model)]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else 0.0


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> None:
    """After an optimizer step: b_i += γ·sign(mean load − load_i) for aux-free routers; loads reset.

    With data parallelism the caller first sums each router's `load` over the ranks (the training loop's
    strategy does), so every rank moves its biases identically.
    """
    for _name, router in routers(model):
        if router.balance != "aux_free":
            continue
        load = router.load
        router.expert_bias += router.bias_rate * torch.sign(load.mean() - load)
        load.zero_()


def load_stats(model: nn.Module) -> dict[str, dict]:
    """Per router: the expert-load histogram, max/mean load, dropped fraction and aux loss of the last step."""
    return {name: dict(router.stats) for name, router in routers(model)}


class GroupedLinear(nn.Module):
    """Stacked expert weights [E, in, out] applied to expert-sorted rows with one grouped GEMM."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from archc.kernels.grouped_gemm import grouped_mm

        dtype = x.dtype
        # As nn.Linear under autocast: compute in the autocast dtype (fp64 stays, as autocast leaves it).
        if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
        return grouped_mm(x, self.weight.to(dtype), counts)

    def extra_repr(self) -> str:
        e, i, o = self.weight.shape
        return f"experts={e}, in_features={i}, out_features={o}"
