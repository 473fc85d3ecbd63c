"""Generation byte by byte for a model that patches by entropy (the BLT): the patches are decided as the bytes
come, from the entropy model run as a recurrence (one new byte per call, its KV cache holding the rest).

After each byte the entropy model gives the entropy of its prediction of the next byte; the patcher's rule
(archc.runtime.patching.Patcher's options) turns the entropies so far into the patch lengths, which decide
whether the next byte starts a patch. The model then runs on the bytes with those lengths handed to its patcher
(`Patcher.fixed`), and the next byte is drawn from its last logits. The threshold rules are causal, so the
bytes and logits are those of re-running the whole model on the whole sequence (tests/compiler/test_blt.py);
top-k patching is not, and a spec whose patcher reads no entropy model decides its patches from the bytes
themselves: both are re-run on the whole sequence at each step.

The entropy model must read the model's own byte input (`EntropyLM(bytes) as entropy_model`), and the entropies
be `entropy(...)` of its output, as specs/blt.arch writes them.
"""

from __future__ import annotations

import contextlib
import copy

import attrs
import torch

from archc.runtime.decoding import sample_next
from archc.runtime.mixers import recurrent
from archc.runtime.patching import Patcher, entropy, patch_lengths


@attrs.frozen
class PatchedGeneration:
    new: list[int]  # the generated ids (raw bytes for the byte tokenizer)
    lengths: list[int]  # the patch lengths of prompt + new bytes (+ the next position), as decided on the way
    logits: torch.Tensor  # [len(new), vocab]: the logits each byte was drawn from


def parts(compiled) -> tuple[str, str | None]:
    """(the patcher's module path, the entropy model's module path or None) of a compiled patching model."""
    graph = compiled.ir
    patches = [n for n in graph.nodes() if n.op == "patch"]
    if len(patches) != 1:
        raise ValueError(f"byte generation needs a model with one `patch(...)`, this one has {len(patches)}")
    node = patches[0]
    args = graph.args(node.id)
    if len(args) < 2 or not node.attrs["mode"] == "entropy":
        return node.path, None
    source = graph.node(args[1])
    inputs = [n.id for n in graph.nodes() if n.op == "input"]
    if source.op != "entropy":
        raise ValueError("byte generation reads the entropies as `entropy(...)` of the entropy model's logits")
    logits = graph.node(graph.args(source.id)[0])
    scope = graph.scopes.get(logits.scope)
    if scope is None or scope.kind != "block" or "." in logits.scope or scope.inputs != inputs[:1]:
        raise ValueError("byte generation runs the entropy model on the model's bytes: call it on the model's input, "
                         "as `entropy(EntropyLM(bytes) as entropy_model)`")
    return node.path, logits.scope


@torch.no_grad()
def generate_bytes(compiled, model: torch.nn.Module, prompt: list[int], max_new: int, *, temperature: float = 1.0,
                   top_k: int | None = None, seed: int = 0, device="cpu") -> PatchedGeneration:
    """Continue `prompt` by `max_new` bytes, deciding the patches on the fly (module doc); temperature 0: greedy."""
    patcher_path, entropy_path = parts(compiled)
    patcher = model.get_submodule(patcher_path)
    assert isinstance(patcher, Patcher)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    on_the_fly = entropy_path is not None and patcher.causal
    entropies: list[torch.Tensor] = []
    new, drawn = [], []
    lengths = None
    # a copy runs as the recurrence: the model's own forward still calls its entropy model on the whole sequence
    entropy_model = copy.deepcopy(model.get_submodule(entropy_path)) if on_the_fly else None
    with recurrent(entropy_model) if on_the_fly else contextlib.nullcontext():
        for step in range(max_new):
            if on_the_fly:
                entropies.append(entropy(entropy_model(x if step == 0 else x[:, -1:])))  # the newest bytes only
                lengths = patch_lengths(tokens=x, entropies=torch.cat(entropies, dim=1), **patcher.options)
                with patcher.fixed(lengths):
                    out = model(x)
            else:
                out = model(x)
                lengths = out.get("lengths")
            logits = out["logits"][:, -1]
            token = logits.argmax(dim=-1) if temperature == 0 else sample_next(logits, temperature, top_k, None,
                                                                               generator)
            drawn.append(logits[0])
            new.append(int(token))
            x = torch.cat([x, token.view(1, 1)], dim=1)
    kept = [] if lengths is None else [int(n) for n in lengths[0] if n > 0]
    return PatchedGeneration(new, kept, torch.stack(drawn) if drawn else torch.empty(0))

