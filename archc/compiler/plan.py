"""Before you rent a cluster: rooflines, memory and parallelism plans computed from the IR.

The arithmetic of "How To Scale Your Model" (Austin et al., 2025; "the book", chapters "Transformer
Math", "How to Parallelize a Transformer for Training", "Training LLaMA 3 on TPUs", "Inference" and
"How to Think About GPUs") applied to a compiled spec, op by op:

- FLOPs are the analysis' forward matmul FLOPs (attention counted in full even when causal); a training
  step is 3x forward (backward = 2x), 4x with recomputation (activation checkpointing of every layer).
- Bytes are `analysis.node_bytes`: what each op reads and writes when run eagerly (inputs, weights, output).
- Each op takes max(FLOPs / peak, bytes / memory bandwidth), the roofline; ops run one after another, and
  the backward pass moves 2x the forward bytes. The optimizer (AdamW) is memory-bound.
- Collectives follow the book's cost models: an all-gather or reduce-scatter of an array of S bytes over X
  devices costs S (X-1)/X / W, an all-reduce twice that, an all-to-all sends each device's (X-1)/X; inside a
  node W is a device's link bandwidth, across nodes the node's NICs, the slower level bounding the time.
- Communication overlaps compute, so a step takes max(compute, communication) (the book's max(T_math,
  T_comms)); a pipeline adds its bubble. Latency, imperfect overlap and kernel efficiency are left out:
  these are lower bounds, as the book's are.
- Memory: weights and gradients in the compute dtype; AdamW keeps two fp32 moments and, below fp32, an
  fp32 master copy (16 bytes per parameter with bf16: 2 + 2 + 8 + 4). Activations are every op's output
  (an upper bound on what autograd keeps) or, with recomputation, each layer's input plus one layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from archc.compiler import analysis
from archc.compiler.hardware import ITEMSIZE, Hardware
from archc.compiler.ir import Graph
from archc.dsl.diagnostics import SpecError

ADAM_MOMENTS = 8  # bytes per parameter: two fp32 moments
MASTER = 4  # bytes per parameter of the fp32 master copy kept when computing below fp32


# ---- the roofline of one forward pass ---------------------------------------------------------------


@attrs.frozen
class OpRow:
    """One op position (repeat indices folded into `*`), forward, per device batch."""

    name: str
    op: str
    count: int
    flops: float  # all instances
    bytes: float  # all instances
    seconds: float  # all instances, each at max(FLOPs / peak, bytes / bandwidth)

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


@attrs.frozen
class Roofline:
    flops: float
    bytes: float
    seconds: float
    rows: tuple[OpRow, ...]


def roofline(graph: Graph, hw: Hardware, dtype: str, batch: float, seq: int,
             dims: dict[str, int] | None = None) -> Roofline:
    """Forward FLOPs, bytes and roofline time of `batch` sequences of `seq` tokens on one device."""
    sizes = analysis.sizes_for(graph, batch, seq, dims)
    peak, item = hw.peak(dtype), ITEMSIZE[dtype]
    groups: dict[tuple[str, str], list[float]] = {}
    for node in graph.nodes():
        flops = analysis.node_cost(graph, node, sizes)[1]
        moved = analysis.node_bytes(graph, node, sizes, item, chunked=not hw.triton)
        if not flops and not moved:
            continue
        key = (".".join("*" if part.isdigit() else part for part in node.path.split(".")), node.op)
        acc = groups.setdefault(key, [0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += flops
        acc[2] += moved
        acc[3] += max(flops / peak, moved / hw.hbm_bw)
    rows = tuple(OpRow(name, op, c, f, b, s) for (name, op), (c, f, b, s) in groups.items())
    return Roofline(sum(r.flops for r in rows), sum(r.bytes for r in rows), sum(r.seconds for r in rows), rows)


# ---- collectives: the book's cost models ------------------------------------------------------------


def gather_seconds(hw: Hardware, nbytes: float, group: int, per_node: int) -> float:
    """All-gather (or reduce-scatter) of an `nbytes` array over `group` devices, `per_node` of them in each
    node: a ring inside each node at the device link bandwidth, then across nodes at this group's share of
    the node's NICs (other groups use the rest); the slower level bounds the time (gpus.md)."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    per_node = max(1, min(per_node, group, hw.devices_per_node))
    nodes = math.ceil(group / per_node)
    inside = nbytes * (per_node - 1) / per_node / hw.intra_bw if per_node > 1 else 0.0
    share = hw.inter_bw * per_node / hw.devices_per_node
    across = nbytes * (nodes - 1) / nodes / share if nodes > 1 else 0.0
    return max(inside, across)


def all_to_all_seconds(hw: Hardware, local_bytes: float, group: int, per_node: int) -> float:
    """All-to-all in which each device sends the (group-1)/group of its `local_bytes` that other devices
    own; what leaves the node shares its NICs with the node's other devices (gpus.md: B (M-1) / (M^2 W))."""
    if group <= 1 or local_bytes <= 0:
        return 0.0
    per_node = max(1, min(per_node, group, hw.devices_per_node))
    inside = local_bytes * (per_node - 1) / group / hw.intra_bw if per_node > 1 else 0.0
    across = local_bytes * (group - per_node) / group / (hw.inter_bw / hw.devices_per_node)
    return max(inside, across)


def network_intensity(hw: Hardware, dtype: str, group: int, per_node: int) -> float:
    """C / W for a collective over this group: FLOPs a device can do while one byte of a gathered array
    arrives (the book's 2550 for one TPU v5p ICI axis, 2475 for H100s across nodes)."""
    seconds = gather_seconds(hw, 1.0, group, per_node)
    return hw.peak(dtype) * seconds if seconds else math.inf


# ---- what the plans need to know about the model -----------------------------------------------------


@attrs.frozen
class ModelFacts:
    params: int
    active: int
    experts: tuple[analysis.RoutedExperts, ...]
    layers: tuple[str, ...]  # repeat-step scopes
    width: int  # residual width D
    ffw: int  # widest input of a projection back to D (the book's F)
    regions: int  # residual sublayers over all layers: the tensor-parallel regions
    layer_params: int  # the largest layer's parameters (what FSDP gathers at once)


def model_facts(graph: Graph) -> ModelFacts:
    """The sizes the parallelism formulas need, read from the IR."""
    layers = tuple(analysis.layer_scopes(graph))

    def inside(node, scope):
        return node.scope == scope or node.scope.startswith(scope + ".")

    nodes = graph.nodes()
    if layers and graph.scopes[layers[0]].inputs:
        width = graph.node(graph.scopes[layers[0]].inputs[0]).shape[-1]
    else:
        width = next((n.shape[-1] for n in nodes if n.op == "embedding"), 0)
    ffw = max((graph.node(graph.args(n.id)[0]).shape[-1] for n in nodes
               if n.op in ("linear", "fused_linear", "grouped_linear") and n.shape and n.shape[-1] == width
               and any(inside(n, s) for s in layers)), default=width)
    regions = sum(1 for n in nodes if n.op == "add" and n.scope in layers and n.shape and n.shape[-1] == width)
    per_layer = [sum(sum(math.prod(s) for s in analysis.node_params(graph, n).values())
                     for n in nodes if inside(n, scope)) for scope in layers]
    return ModelFacts(analysis.total_params(graph), analysis.active_params(graph),
                      tuple(analysis.routed_experts(graph)), layers, width, ffw, regions, max(per_layer, default=0))


@attrs.frozen
class Activations:
    full: float  # every op output, whole local batch
    recompute: float  # layer inputs + one layer's outputs + what lies outside the layers
    checkpoints: float  # of which the layer inputs (one checkpoint per layer)


def activations(graph: Graph, layers: tuple[str, ...], sizes: dict[str, int], item: float,
                chunked: bool = False) -> Activations:
    """Bytes kept for the backward pass: every op's output, or with recomputation (one checkpoint per
    layer) the layers' inputs, the largest layer's outputs (recomputed one layer at a time) and the rest."""
    full = 0.0
    per_layer = {s: 0.0 for s in layers}
    outside = 0.0
    owner = {}
    for node in graph.nodes():
        kept = analysis.activation_bytes(graph, node, sizes, item, chunked)
        full += kept
        if node.scope not in owner:
            owner[node.scope] = next((s for s in layers if node.scope == s or node.scope.startswith(s + ".")), None)
        scope = owner[node.scope]
        if scope is None:
            outside += kept
        else:
            per_layer[scope] += kept
    if not layers:
        return Activations(full, full, 0.0)
    inputs = sum(sum(analysis.activation_bytes(graph, graph.node(i), sizes, item)
                     for i in graph.scopes[s].inputs) for s in layers)
    return Activations(full, inputs + max(per_layer.values()) + outside, inputs)


# ---- training plans ------------------------------------------------------------------------------------


@attrs.frozen
class Memory:
    params: float
    grads: float
    optimizer: float  # moments + master copy
    activations: float
    recompute: bool

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


@attrs.frozen
class Comm:
    what: str
    seconds: float


@attrs.frozen
class Strategy:
    name: str
    degrees: str  # "fsdp=8 tp=8 accum=2"
    memory: Memory
    fits: bool
    compute_s: float
    comms: tuple[Comm, ...]
    bubble: float  # fraction of compute added by a pipeline's bubble
    accum: int  # micro-batches per step (gradient accumulation), to fit activations
    why: str

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for c in self.comms)

    @property
    def busy_s(self) -> float:
        return self.compute_s * (1 + self.bubble)

    @property
    def step_s(self) -> float:
        return max(self.busy_s, self.comm_s)

    @property
    def bound(self) -> str:
        return "compute" if self.busy_s >= self.comm_s else "communication"


@attrs.frozen
class Setting:
    """Everything a plan is computed for."""

    graph: Graph
    hw: Hardware
    devices: int
    batch: int  # sequences per step, all devices together
    seq: int
    dtype: str
    dims: dict[str, int] | None
    facts: ModelFacts

    @property
    def item(self) -> float:
        return ITEMSIZE[self.dtype]

    @property
    def peak(self) -> float:
        return self.hw.peak(self.dtype)

    def state_bytes(self, params: float, opt_params: float) -> tuple[float, float, float]:
        """Weights and gradients of `params`, optimizer state of `opt_params`."""
        opt = opt_params * (ADAM_MOMENTS + (MASTER if self.dtype != "fp32" else 0))
        return params * self.item, params * self.item, opt

    def optimizer_seconds(self, opt_params: float) -> float:
        # AdamW reads the gradient and reads and writes the fp32 moments and master (or fp32 weights);
        # below fp32 it also writes the compute-dtype copy of the weights.
        per_param = self.item + 3 * 8 + (self.item if self.dtype != "fp32" else 0)
        return opt_params * per_param / self.hw.hbm_bw


class _Costs:
    """Roofline times and activation sizes per local batch, computed once each."""

    def __init__(self, s: Setting) -> None:
        self.s = s
        self._forward: dict[float, float] = {}
        self._act: dict[float, Activations] = {}

    def forward(self, local_batch: float) -> float:
        if local_batch not in self._forward:
            s = self.s
            self._forward[local_batch] = roofline(s.graph, s.hw, s.dtype, local_batch, s.seq, s.dims).seconds
        return self._forward[local_batch]

    def activations(self, local_batch: float) -> Activations:
        if local_batch not in self._act:
            s = self.s
            sizes = analysis.sizes_for(s.graph, local_batch, s.seq, s.dims)
            self._act[local_batch] = activations(s.graph, s.facts.layers, sizes, s.item, not s.hw.triton)
        return self._act[local_batch]

    def compute(self, local_batch: float, model_parallel: int, opt_params: float) -> Callable[[bool], float]:
        """Training compute of one step: forward, backward (2x), a recomputed forward, AdamW."""
        forward = self.forward(local_batch) / model_parallel
        return lambda recompute: (4 if recompute else 3) * forward + self.s.optimizer_seconds(opt_params)


def _choose(s: Setting, name: str, degrees: str, state: tuple[float, float, float], act: Activations,
            act_share: float, compute: Callable[[bool], float], comms: Callable[[int], tuple[Comm, ...]],
            why: Callable[[int], str], max_accum: float, bubble: float = 0.0) -> Strategy:
    """The fastest way to run a strategy that fits in memory: without or with recomputation, with the
    batch split into 1, 2, 4, ... micro-batches (each at least a sequence); else its smallest form."""
    options = []
    accum = 1
    while True:
        for recompute in (False, True):
            memory = Memory(*state, (act.recompute if recompute else act.full) * act_share / accum, recompute)
            label = " ".join(filter(None, (degrees, f"accum={accum}" if accum > 1 else "")))
            options.append(Strategy(name, label, memory, memory.total <= s.hw.hbm_bytes, compute(recompute),
                                    comms(accum), bubble, accum, why(accum)))
        if accum * 2 > max_accum:
            break
        accum *= 2
    fitting = [o for o in options if o.fits]
    return min(fitting, key=lambda o: o.step_s) if fitting else min(options, key=lambda o: o.memory.total)


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 2
    while p <= limit:
        out.append(p)
        p *= 2
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


TIE = 0.02  # step times closer than this are a tie: the simpler plan (listed first, smaller degree) wins


def _better(a: Strategy | None, b: Strategy) -> Strategy:
    """Of two forms of one plan (`a` the smaller degree): the one that fits, then the faster, then `a`."""
    if a is None:
        return b
    if a.fits != b.fits:
        return a if a.fits else b
    if not a.fits:
        return a if a.memory.total <= b.memory.total else b
    if abs(a.step_s - b.step_s) > TIE * min(a.step_s, b.step_s):
        return a if a.step_s < b.step_s else b
    return a  # the smaller degree: model-parallel collectives sit on the critical path


def strategies(s: Setting) -> list[Strategy]:
    """Data parallel, FSDP, FSDP + tensor parallel, expert parallel (MoE) and pipeline plans, each at the
    degrees that give the shortest step among those that fit in memory."""
    f, hw, n = s.facts, s.hw, s.devices
    dpn = min(hw.devices_per_node, n)
    tokens = s.batch * s.seq
    costs = _Costs(s)
    weights = f.params * s.item
    gathered = 2 * f.layer_params * s.item  # FSDP holds this layer's and the next one's weights
    out = []

    alpha = network_intensity(hw, s.dtype, n, dpn)
    scale = f.params / f.active

    def dp_why(accum: int) -> str:
        per = tokens / n / accum
        text = (f"DP and FSDP are compute-bound when tokens per device B/X = {per:,.0f}"
                f"{' per micro-batch' if accum > 1 else ''} exceed C/W = {alpha:,.0f} (the book's "
                f"data-parallel condition: {'met' if per > alpha * scale else 'not met'})")
        if f.experts:
            text += (f"; an MoE moves all {_si(f.params)} weights for {_si(f.active)} active ones, so the bar is "
                     f"(N/N_active) C/W = {alpha * scale:,.0f}")
        return text

    local = s.batch / n
    if n == 1:
        return [_choose(s, "one device", "", s.state_bytes(f.params, f.params), costs.activations(local), 1.0,
                        costs.compute(local, 1, f.params), lambda a: (),
                        lambda a: "one device: no communication", local)]

    # data parallel: everything replicated, gradients all-reduced once per step
    out.append(_choose(s, "DP", f"dp={n}", s.state_bytes(f.params, f.params), costs.activations(local), 1.0,
                       costs.compute(local, 1, f.params),
                       lambda a: (Comm("all-reduce gradients", 2 * gather_seconds(hw, weights, n, dpn)),),
                       lambda a: dp_why(a) + "; every device holds all weights and optimizer state", local))

    # FSDP (ZeRO-3): weights, gradients and optimizer state sharded; weights gathered for every micro-batch
    params, grads, opt = s.state_bytes(f.params / n, f.params / n)
    ag = gather_seconds(hw, weights, n, dpn)
    out.append(_choose(s, "FSDP", f"fsdp={n}", (params + gathered, grads, opt), costs.activations(local), 1.0,
                       costs.compute(local, 1, f.params / n),
                       lambda a: (Comm("all-gather weights (fwd + bwd)", 2 * a * ag),
                                  Comm("reduce-scatter gradients", a * ag)), dp_why, local))

    # FSDP + tensor parallel (Megatron): TP over Y devices (inside a node first), FSDP over the rest
    best = None
    tp_hw, rest_hw = hw.axes(1), hw.axes(hw.ici_axes - 1)  # on a torus TP takes one axis, FSDP the others
    for y in _powers_of_two(min(n, 2 * hw.devices_per_node, 64)):
        if n % y:
            continue
        x, x_per_node = n // y, max(1, dpn // y)
        local = s.batch / x
        ag = gather_seconds(rest_hw, weights / y, x, x_per_node)
        act_bytes = local * s.seq * f.width * s.item  # one [tokens, D] activation of this TP group
        tp = 4 * f.regions * gather_seconds(tp_hw, act_bytes, y, min(y, dpn))
        alpha_tp = network_intensity(tp_hw, s.dtype, y, min(y, dpn))
        floor = 2 * network_intensity(rest_hw, s.dtype, x, x_per_node) ** 2 / f.ffw if f.ffw else math.inf

        def why(a, y=y, alpha_tp=alpha_tp, floor=floor):
            return (f"TP moves activations, hidden under the matmuls while Y < F / (C/W) = {f.ffw:,} / "
                    f"{alpha_tp:,.0f} = {f.ffw / alpha_tp:.1f} (the book's tensor-parallel condition; here Y = {y}); "
                    f"mixed with FSDP the "
                    f"per-device batch may drop to 2 (C/W)^2 / F = {floor:,.0f} tokens (here {tokens / n / a:,.0f})")

        params, grads, opt = s.state_bytes(f.params / n, f.params / n)
        candidate = _choose(s, "FSDP+TP", f"fsdp={x} tp={y}", (params + gathered / y, grads, opt),
                            costs.activations(local), 1.0 / y, costs.compute(local, y, f.params / n),
                            lambda a, ag=ag, tp=tp: (Comm("all-gather weights (fwd + bwd)", 2 * a * ag),
                                                     Comm("reduce-scatter gradients", a * ag),
                                                     Comm("TP all-gathers + reduce-scatters of activations", tp)),
                            why, local)
        best = _better(best, candidate)
    if best:
        out.append(best)

    # expert parallel (MoE): experts sharded over Z devices, tokens sent to them by all-to-all; the rest FSDP
    if f.experts:
        expert_params = sum(r.params for r in f.experts)
        dense_ag = gather_seconds(hw, (f.params - expert_params) * s.item, n, dpn)
        local = s.batch / n
        best = None
        for z in _divisors(math.gcd(f.experts[0].experts, n)):
            r = n // z
            expert_ag = gather_seconds(rest_hw, expert_params / z * s.item, r, max(1, dpn // z))
            sent = sum(4 * local * s.seq * e.top_k * e.width * s.item for e in f.experts)
            a2a = all_to_all_seconds(tp_hw, sent, z, min(z, dpn))

            def why(a, z=z, r=r):
                return (f"expert parallelism moves tokens, not expert weights: all-to-alls of k x D per token "
                        f"(dispatch and combine, forward and backward) over Z = {z}, and each expert's weights "
                        f"gather over only {r} replicas; " + dp_why(a))

            params, grads, opt = s.state_bytes(f.params / n, f.params / n)
            candidate = _choose(s, "EP+FSDP", f"ep={z} fsdp={n}", (params + gathered, grads, opt),
                                costs.activations(local), 1.0, costs.compute(local, 1, f.params / n),
                                lambda a, expert_ag=expert_ag, a2a=a2a: (
                                    Comm("all-gather dense weights (fwd + bwd)", 2 * a * dense_ag),
                                    Comm("reduce-scatter dense gradients", a * dense_ag),
                                    Comm("gather + reduce-scatter expert weights", 3 * a * expert_ag),
                                    Comm("all-to-all of routed tokens (fwd + bwd)", a2a)),
                                why, local)
            best = _better(best, candidate)
        if best:
            out.append(best)

    # pipeline: layers in S stages, data parallel (ZeRO-1: optimizer state sharded) over the rest
    if len(f.layers) >= 2:
        best = None
        for stages in _divisors(len(f.layers)):
            if stages > n or n % stages:
                continue
            d = n // stages
            local = s.batch / d
            micro = max(1, min(int(local), 4 * stages))
            act_bytes = local * s.seq * f.width * s.item
            link = hw.intra_bw if stages <= dpn else hw.inter_bw / hw.devices_per_node
            allreduce = 2 * gather_seconds(hw, weights / stages, d, max(1, dpn // stages))
            params, grads, _ = s.state_bytes(f.params / stages, 0)
            opt = s.state_bytes(0, f.params / n)[2]

            def why(a, stages=stages, micro=micro, d=d, act_bytes=act_bytes):
                return (f"pipelining sends only activations between {stages} stages ({_si(2 * act_bytes, 'B')} a "
                        f"device per step), but its bubble idles (S-1)/M = {stages - 1}/{micro} of the compute, "
                        f"and each stage all-reduces its gradients over {d} replicas")

            candidate = _choose(s, "PP+DP", f"pp={stages} dp={d} micro={micro}", (params, grads, opt),
                                costs.activations(local), 1.0 / micro, costs.compute(local, stages, f.params / n),
                                lambda a, act_bytes=act_bytes, link=link, allreduce=allreduce: (
                                    Comm("send activations and their gradients between stages",
                                         2 * act_bytes / link),
                                    Comm("all-reduce gradients", allreduce)),
                                why, 1, bubble=(stages - 1) / micro)
            best = _better(best, candidate)
        if best:
            out.append(best)
    return out


def recommend(options: list[Strategy]) -> Strategy | None:
    """The fastest plan that fits; within a tie the one listed first, the simpler."""
    fitting = [o for o in options if o.fits]
    if not fitting:
        return None
    fastest = min(o.step_s for o in fitting)
    return next(o for o in fitting if o.step_s <= fastest * (1 + TIE))


# ---- DiLoCo and inference ---------------------------------------------------------------------------------


@attrs.frozen
class DiLoCo:
    replicas: int
    inner_steps: int
    bytes_per_outer_step: float  # one replica sends, ring all-reduce of fp32 outer gradients
    bytes_per_token: float  # all replicas together, per training token
    dp_bytes_per_token: float  # the same for data parallel across the replicas (an all-reduce every step)
    sync_s: float  # one outer all-reduce over the replicas' link


def diloco(s: Setting, inner_steps: int) -> DiLoCo | None:
    """DiLoCo with one replica per node (the slow links are between nodes), counting bytes as the runtime
    does (archc.training.distributed.diloco): an all_reduce sends 2 (R-1)/R of the parameters in fp32."""
    replicas = math.ceil(s.devices / s.hw.devices_per_node)
    if replicas < 2:
        return None
    per_replica = 2 * (replicas - 1) / replicas * s.facts.params * 4
    tokens = s.batch * s.seq
    dp = replicas * 2 * (replicas - 1) / replicas * s.facts.params * s.item / tokens
    return DiLoCo(replicas, inner_steps, per_replica, replicas * per_replica / (inner_steps * tokens), dp,
                  per_replica / s.hw.inter_bw)


@attrs.frozen
class Inference:
    kv_bytes_per_token: float  # all layers, compute dtype
    state_bytes_per_sequence: float  # recurrent mixer state (fp32), constant in the context
    prefill: Roofline  # one sequence of `seq` tokens on one device
    batch: int
    context: int
    decode_flops: float  # one step of `batch` sequences, all devices
    decode_bytes: float
    decode_s: float  # over all devices (the model sharded over them)
    weights_read: float
    critical_batch: float  # batch above which decoding becomes compute-bound (weights only)
    kv_intensity: float  # FLOPs per byte of KV cache read, the cap on decode intensity at this context
    fits_batch: int  # largest batch whose weights + caches fit in all devices' memory

    @property
    def decode_intensity(self) -> float:
        return self.decode_flops / self.decode_bytes

    def tokens_per_s_per_device(self, devices: int) -> float:
        return self.batch / self.decode_s / devices


def inference(s: Setting, batch: int) -> Inference:
    g, hw, f = s.graph, s.hw, s.facts
    kv = analysis.kv_cache_per_token(g) * s.item
    state = sum(analysis.recurrent_state(g).values()) * 4
    prefill = roofline(g, hw, s.dtype, 1, s.seq, s.dims)
    # Per decoded token the layers cost what they cost per token of a prefill at this context: linear
    # layers the same, attention over the whole context (or its window), mixers their per-token update.
    per_token = prefill.flops / s.seq
    expert_params = sum(r.params for r in f.experts)
    touched = sum(r.params * (1 - (1 - r.top_k / r.experts) ** batch) for r in f.experts)
    weights = (f.params - expert_params + touched) * s.item
    flops = per_token * batch
    moved = weights + batch * (s.seq * kv + 2 * state)
    seconds = max(flops / (s.devices * s.peak), moved / (s.devices * hw.hbm_bw))
    critical = s.peak * weights / (hw.hbm_bw * per_token)
    kv_intensity = per_token / (s.seq * kv) if kv else math.inf
    room = s.devices * hw.hbm_bytes - f.params * s.item
    per_seq = s.seq * kv + state
    fits = max(0, int(room // per_seq)) if per_seq else (1 << 31 if room > 0 else 0)
    return Inference(kv, state, prefill, batch, s.seq, flops, moved, seconds, weights, critical,
                     kv_intensity, fits)


# ---- the plan ------------------------------------------------------------------------------------------------


@attrs.define
class Plan:
    setting: Setting
    ops: Roofline  # forward, one device's share of the batch under data parallelism
    options: list[Strategy]
    best: Strategy | None
    diloco: DiLoCo | None
    inference: Inference

    @property
    def train_flops(self) -> float:
        s = self.setting
        return 3 * analysis.forward_flops(s.graph, s.batch, s.seq, s.dims)

    def flops_bound_s(self) -> float:
        """Step time if every device ran at peak and nothing else cost anything."""
        s = self.setting
        return self.train_flops / (s.devices * s.peak)

    def text(self, top: int = 12) -> str:
        return render(self, top)


def plan(graph: Graph, hardware: Hardware, devices: int = 1, batch: int = 1, seq: int = 128,
         dtype: str = "bf16", dims: dict[str, int] | None = None, inner_steps: int = 50,
         decode_batch: int | None = None) -> Plan:
    """Rooflines, memory, parallelism plans and inference bounds of `graph` on `devices` x `hardware`."""
    for value, flag in ((devices, "--devices"), (batch, "--batch"), (seq, "--seq"), (inner_steps, "--inner-steps")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(f"{flag}: expected a positive integer, got {value!r}")
    if devices > 1 and hardware.intra_bw <= 0:
        raise SpecError(f"--devices {devices}: {hardware.title} is one machine with no links to others",
                        hint="--hardware local plans one device; name an accelerator (h100, v5p, ...) for more")
    hardware.peak(dtype)  # the dtype must be one the hardware lists
    s = Setting(graph, hardware, devices, batch, seq, dtype, dims, model_facts(graph))
    options = strategies(s)
    ops = roofline(graph, hardware, dtype, batch / devices, seq, dims)
    return Plan(s, ops, options, recommend(options), diloco(s, inner_steps), inference(s, decode_batch or batch))


# ---- text -------------------------------------------------------------------------------------------------------


def _si(x: float, unit: str = "") -> str:
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cols):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def render(p: Plan, top: int = 12) -> str:
    s, hw = p.setting, p.setting.hw
    f = s.facts
    tokens = s.batch * s.seq
    ridge = hw.ridge(s.dtype)
    node = f" ({hw.devices_per_node} per node)" if hw.devices_per_node > 1 else ""
    lines = [(f"{s.graph.name} on {s.devices} x {hw.title}{node}, {s.dtype}, "
              f"batch {s.batch} x {s.seq} = {tokens:,} tokens per step")]
    if hw.note:
        lines.append(f"hardware: {hw.note}")
    active = f" ({_si(f.active)} active per token)" if f.active != f.params else ""
    lines.append(f"parameters {_si(f.params)}{active}; training {_si(p.train_flops / tokens)}FLOPs per token "
                 f"= {p.train_flops / tokens / max(f.active, 1):.2f} x active params (6N plus attention)")
    lines.append(f"roofline: {_si(s.peak)}FLOP/s {s.dtype}, {_si(hw.hbm_bw)}B/s memory -> ridge "
                 f"{ridge:,.0f} FLOPs/byte; an op below it is memory-bound")
    lines.append("")
    per_dev = s.batch / s.devices
    lines.append(f"forward per op, one device's {per_dev:g} sequences ({per_dev * s.seq:,.0f} tokens) "
                 f"under data parallelism:")
    rows = sorted(p.ops.rows, key=lambda r: -r.seconds)[:top]
    order = {r: i for i, r in enumerate(p.ops.rows)}
    body = [(r.name, r.op, str(r.count), _si(r.flops), _si(r.bytes, "B"),
             "inf" if math.isinf(r.intensity) else f"{r.intensity:,.0f}",
             "compute" if r.intensity >= ridge else "memory", _time(r.seconds))
            for r in sorted(rows, key=order.get)]
    lines += ["  " + x for x in _table(("op", "kind", "count", "FLOPs", "bytes", "FLOPs/B", "bound", "time"),
                                       body, left=2)]
    hidden = len(p.ops.rows) - len(rows)
    compute_s = sum(r.seconds for r in p.ops.rows if r.intensity >= ridge)
    lines.append(f"  forward lower bound {_time(p.ops.seconds)} ({compute_s / p.ops.seconds:.0%} in compute-bound "
                 f"ops){f'; {hidden} smaller op kinds not listed' if hidden else ''}")
    lines.append("")

    lines.append("training plans, per device (AdamW: weights and gradients in the compute dtype, "
                 f"2 fp32 moments{' + fp32 master' if s.dtype != 'fp32' else ''}):")
    body = []
    for o in p.options:
        m = o.memory
        body.append((o.name, o.degrees, _si(m.params, "B"), _si(m.grads, "B"), _si(m.optimizer, "B"),
                     _si(m.activations, "B") + (" (recompute)" if m.recompute else ""), _si(m.total, "B"),
                     "yes" if o.fits else "NO", _time(o.busy_s), _time(o.comm_s),
                     _time(o.step_s), o.bound))
    lines += ["  " + x for x in _table(("plan", "degrees", "weights", "grads", "optimizer", "activations",
                                        "total", "fits", "compute", "comms", "step", "bound"), body, left=2)]
    lines.append(f"  HBM {_si(hw.hbm_bytes, 'B')} per device; "
                 f"FLOPs alone (every device at peak): {_time(p.flops_bound_s())} per step")
    if p.best:
        b = p.best
        mfu = p.train_flops / (b.step_s * s.devices * s.peak)
        label = f"{b.name} ({b.degrees})" if b.degrees else b.name
        lines.append(f"recommended: {label}, {_time(b.step_s)} per step lower bound "
                     f"({tokens / b.step_s:,.0f} tokens/s, at most {mfu:.0%} MFU), {b.bound}-bound")
        lines.append(f"  why: {b.why}")
        for c in b.comms:
            lines.append(f"  {c.what}: {_time(c.seconds)}")
        if b.memory.recompute:
            lines.append("  activations only fit recomputed: each layer's input is kept, the rest recomputed "
                         "in the backward pass (one more forward)")
    else:
        smallest = min(p.options, key=lambda o: o.memory.total)
        need = math.ceil(smallest.memory.total * s.devices / hw.hbm_bytes)
        lines.append(f"no plan fits: the smallest, {smallest.name}, needs {_si(smallest.memory.total, 'B')} per "
                     f"device; try about {need} devices, a smaller batch, or --seq shorter")
    if p.diloco:
        d = p.diloco
        lines.append(f"DiLoCo, one replica per node ({d.replicas}), H = {d.inner_steps}: "
                     f"{_si(d.bytes_per_outer_step, 'B')} sent per replica per outer step ({_time(d.sync_s)} over "
                     f"the node's NICs), {_si(d.bytes_per_token, 'B')} per token against "
                     f"{_si(d.dp_bytes_per_token, 'B')} for data parallel across nodes "
                     f"({d.dp_bytes_per_token / d.bytes_per_token:,.0f}x fewer)")
    lines.append("")

    i = p.inference
    lines.append("inference:")
    if i.kv_bytes_per_token:
        lines.append(f"  KV cache {i.kv_bytes_per_token:,.0f} bytes per token ({s.dtype}), "
                     f"{_si(i.kv_bytes_per_token * s.seq, 'B')} per {s.seq}-token sequence")
    if i.state_bytes_per_sequence:
        lines.append(f"  recurrent state {_si(i.state_bytes_per_sequence, 'B')} per sequence (fp32), "
                     "constant in the context length")
    pre = i.prefill
    lines.append(f"  prefill of one {s.seq}-token sequence: {pre.flops / pre.bytes:,.0f} FLOPs/byte "
                 f"({'compute' if pre.flops / pre.bytes >= ridge else 'memory'}-bound), "
                 f"{_time(pre.seconds / s.devices)} sharded over {s.devices} device(s), "
                 f"{s.seq / pre.seconds:,.0f} tokens/s per device")
    lines.append(f"  decode, batch {i.batch} at context {i.context}, sharded over {s.devices} device(s): "
                 f"{i.decode_intensity:,.1f} FLOPs/byte, {_time(i.decode_s)} per step, "
                 f"{i.tokens_per_s_per_device(s.devices):,.0f} tokens/s per device (upper bound)")
    cap = "" if math.isinf(i.kv_intensity) else (f"; reading the KV cache caps it at {i.kv_intensity:,.0f} "
                                                  "FLOPs/byte at this context")
    lines.append(f"  decoding is compute-bound above batch {i.critical_batch:,.0f} (weights alone){cap}; "
                 f"weights + caches fit up to batch {i.fits_batch:,}")
    return "\n".join(lines) + "\n"
