"""Learned tensors and initialisation rules, as generated code writes them.

`AF.learned((1, 1, 64), AF.Init.trunc_normal(std=0.02))` is a parameter made by a rule;
`AF.initialised(nn.Linear(64, 384), weight=AF.Init.zeros())` initialises a module's weight (and bias)
by the spec's rules and marks them, so that the model's `AF.init_weights` leaves them as they are.
`AF.Bias(n)` holds the bias of a linear whose weight is tied to an embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_MARK = "archc_initialised"  # set on a tensor whose initialisation the spec chose


@dataclass(frozen=True)
class Init:
    """An initialisation rule: `rule` with its arguments (GRAMMAR.md, "Learned tensors and initialisation")."""

    rule: str
    args: tuple[tuple[str, float], ...] = ()

    @classmethod
    def zeros(cls) -> Init:
        return cls("zeros")

    @classmethod
    def ones(cls) -> Init:
        return cls("ones")

    @classmethod
    def constant(cls, value: float) -> Init:
        return cls("constant", (("value", value),))

    @classmethod
    def normal(cls, std: float, mean: float = 0.0) -> Init:
        return cls("normal", (("std", std), ("mean", mean)))

    @classmethod
    def trunc_normal(cls, std: float, mean: float = 0.0, low: float | None = None, high: float | None = None) -> Init:
        """Normal, redrawn outside [low, high]: by default two standard deviations either side of the mean."""
        return cls("trunc_normal", (("std", std), ("mean", mean), ("low", mean - 2 * std if low is None else low),
                                    ("high", mean + 2 * std if high is None else high)))

    @classmethod
    def uniform(cls, low: float, high: float) -> Init:
        return cls("uniform", (("low", low), ("high", high)))

    @torch.no_grad()
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        a = dict(self.args)
        if self.rule == "zeros":
            tensor.zero_()
        elif self.rule == "ones":
            tensor.fill_(1.0)
        elif self.rule == "constant":
            tensor.fill_(a["value"])
        elif self.rule == "normal":
            tensor.normal_(a["mean"], a["std"])
        elif self.rule == "trunc_normal":
            nn.init.trunc_normal_(tensor, a["mean"], a["std"], a["low"], a["high"])
        elif self.rule == "uniform":
            tensor.uniform_(a["low"], a["high"])
        else:
            raise ValueError(f"unknown initialisation rule {self.rule!r}")
        setattr(tensor, _MARK, True)
        return tensor


def learned(shape: tuple[int, ...], init: Init) -> nn.Parameter:
    """A trained tensor of `shape` (`()`: a scalar) made by `init`."""
    param = nn.Parameter(torch.empty(shape))
    init(param)
    setattr(param, _MARK, True)
    return param


def initialised(module: nn.Module, weight: Init | None = None, bias: Init | None = None) -> nn.Module:
    """`module` with its `weight` and `bias` set by these rules (the others are left to `init_weights`)."""
    for name, rule in (("weight", weight), ("bias", bias)):
        if rule is not None:
            rule(getattr(module, name))
    return module


def chosen(tensor: torch.Tensor | None) -> bool:
    """Whether the spec chose how `tensor` starts (then the model's default initialisation skips it)."""
    return tensor is not None and getattr(tensor, _MARK, False)


class Bias(nn.Module):
    """The bias of a linear whose weight is another module's (`linear(h, vocab, bias=true, tie=emb)`)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features))

    def extra_repr(self) -> str:
        return f"features={self.bias.shape[0]}"
