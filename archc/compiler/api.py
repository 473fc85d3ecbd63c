"""`archc.compile()`: spec -> AST -> IR -> named passes -> readable PyTorch source."""

from __future__ import annotations

import builtins
import contextlib
import gc
import linecache
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from archc.compiler import analysis, ops, resources
from archc.compiler.codegen import GeneratedCode, generate
from archc.compiler.ir import Graph
from archc.compiler.lower import Spec, load_spec, lower, resolve_params
from archc.compiler.ops import patching
from archc.compiler.passes import PASS_NAMES, PASSES
from archc.compiler.verify import verify
from archc.dsl.diagnostics import SpecError, SpecWarning, did_you_mean


@attrs.frozen
class Options:
    kernels: dict[str, str] = attrs.Factory(dict)  # node-path glob -> attention kernel
    disabled: tuple[str, ...] = ()  # passes turned off with --no-pass


@attrs.define
class Compiled:
    """What `archc.compile()` returns: the source, the IR at every stage, analyses, and the module."""

    spec: Spec
    params: dict[str, Any]
    stages: list[tuple[str, Graph]]
    code: GeneratedCode
    options: Options
    warnings: tuple[SpecWarning, ...] = ()  # compiles, but likely not what was meant (located)

    @property
    def ir(self) -> Graph:
        """The optimised IR that the code was generated from."""
        return self.stages[-1][1]

    @property
    def source(self) -> str:
        return self.code.source

    @property
    def class_name(self) -> str:
        return self.code.class_name

    def ir_after(self, pass_name: str) -> Graph:
        for name, graph in self.stages:
            if name == pass_name:
                return graph
        raise KeyError(pass_name)

    def summary(self, batch: int = 1, seq: int = 128, depth: int = 1, dims: dict[str, int] | None = None) -> str:
        return (analysis.table(self.ir, batch, seq, depth, dims) + _attention_summary(self.ir, batch, seq, dims)
                + _lanes_summary(self.ir, batch, seq, dims) + _patching_summary(self.ir, batch, seq, dims))

    def num_params(self) -> int:
        return analysis.total_params(self.ir)

    def active_params(self) -> int:
        """Parameters each token uses (differs from num_params with routed experts)."""
        return analysis.active_params(self.ir)

    def flops(self, batch: int, seq: int) -> int:
        """Forward matmul FLOPs of one step at this batch size and sequence length."""
        return analysis.forward_flops(self.ir, batch, seq)

    def plan(self, hardware: Any = "h100", devices: int = 1, batch: int = 1, seq: int = 2048, dtype: str = "bf16",
             **options: Any):
        """Per-op rooflines, memory per device, parallelism plans and inference bounds on `devices` x
        `hardware` (a name from hardware.toml, or a `Hardware`, e.g. archc.training.hardware_probe.measure())."""
        from archc.compiler import hardware as known
        from archc.compiler import plan

        device = known.load(hardware) if isinstance(hardware, str) else hardware
        return plan.plan(self.ir, device, devices, batch, seq, dtype, **options)

    def param_roles(self) -> dict[str, str]:
        """State-dict name -> embedding | memory | head | matrix | norm | bias (see analysis.param_roles)."""
        return analysis.param_roles(self.ir)

    def python_module(self) -> types.ModuleType:
        """Execute the generated source as a module; tracebacks show its lines (linecache)."""
        filename = f"<archc:{self.class_name}:{self.ir.meta.get('sha256', '')}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        module = types.ModuleType(f"archc_generated_{self.class_name}")
        module.__file__ = filename
        exec(builtins.compile(self.source, filename, "exec"), module.__dict__)  # our own generated text only
        return module

    def build(self, device: Any = None, dtype: Any = None, *, check_memory: bool = True):
        """A fresh instance of the generated model. Unless `check_memory` is false, a model whose weights
        alone exceed the memory free where they are made (the CPU, then `device`) is refused
        (resources.ResourceError) before anything is allocated."""
        if check_memory:
            self.check_build_memory(device, dtype)
        model = getattr(self.python_module(), self.class_name)()
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model

    def check_build_memory(self, device: Any = None, dtype: Any = None) -> None:
        """Refuse (resources.ResourceError) to build a model whose weights exceed the free memory of the CPU
        (the module is constructed there, in float32) or of `device` (in `dtype`)."""
        n = self.num_params()
        fix = "shrink the spec's parameters (-D) or use a smaller checkpoint"
        what = f"building {self.class_name}"
        resources.check_fits(n * 4, what, f"{n:,} parameters x 4 bytes", "cpu", fix)
        if device is not None and not str(device).startswith("cpu"):
            itemsize = getattr(dtype, "itemsize", 4) if dtype is not None else 4
            resources.check_fits(n * itemsize, what, f"{n:,} parameters x {itemsize} bytes", device, fix)

    def canonical_names(self) -> dict[str, tuple]:
        """State-dict names before projection fusion -> shapes (what weight maps target)."""
        graph = self.ir_after("infer_shapes")
        return {k: v for n in graph.nodes() for k, v in analysis.node_params(graph, n).items()}


def compile(
    spec: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    kernels: dict[str, str] | None = None,
    disable: tuple[str, ...] | list[str] = (),
    on_stage: Callable[[str, Graph], None] | None = None,
    name: str | None = None,
    **kw_overrides: Any,
) -> Compiled:
    """Compile a spec (a path to a .arch file, or its text) to a PyTorch module.

    Overrides replace spec parameters: `archc.compile("llama.arch", d_model=256)`.
    `on_stage(pass_name, graph)` sees the IR after lowering and after each pass.
    """
    overrides = {**(overrides or {}), **kw_overrides}
    for pass_name in disable:
        if pass_name not in PASS_NAMES:
            raise SpecError(f"--no-pass {pass_name}: no such pass",
                            hint=did_you_mean(pass_name, PASS_NAMES) or f"passes: {', '.join(PASS_NAMES)}")
        if not dict((n, opt) for n, _f, opt in PASSES)[pass_name]:
            raise SpecError(f"--no-pass {pass_name}: this pass is required and cannot be turned off")
    options = Options(dict(kernels or {}), tuple(disable))
    with _no_cyclic_gc():
        return _compile(spec, name, overrides, options, on_stage)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Compiling allocates many small objects and keeps the IR of every stage; the cyclic collector's full
    passes over all of them made compile time grow faster than the number of layers. It is paused while
    compiling; whatever cycles a compile leaves behind are collected once it resumes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compile(spec, name, overrides, options: Options, on_stage) -> Compiled:
    loaded = load_spec(spec, name)
    params = resolve_params(loaded, overrides)
    graph = lower(loaded, params)
    verify(graph)
    stages = [("lower", graph)]
    if on_stage:
        on_stage("lower", graph)
    for pass_name, run_pass, _optional in PASSES:
        if pass_name in options.disabled:
            continue
        graph = run_pass(graph, options)
        verify(graph, folded=True, shaped=pass_name != "fold_params")
        stages.append((pass_name, graph))
        if on_stage:
            on_stage(pass_name, graph)
    _check_kernel_patterns(graph, options)
    code = generate(graph, _header(graph, params))
    warnings = tuple(w for node in graph.nodes() for w in ops.REGISTRY[node.op].warnings(node, graph))
    return Compiled(loaded, params, stages, code, options, warnings)


def _check_kernel_patterns(graph: Graph, options: Options) -> None:
    """A --kernel pattern that matches no layer is a typo (or the wrong spec), not a request to do nothing."""
    from archc.compiler.passes.choose_kernels import _matches  # the pass's own matching rule

    targets = [n for n in graph.nodes() if ops.REGISTRY[n.op].kernel_family]
    for pattern, kernel in options.kernels.items():
        if any(_matches(pattern, n) for n in targets):
            continue
        layers = [f"{n.scope} ({ops.REGISTRY[n.op].kernel_groups[-1]})" for n in targets]
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        groups = sorted({g for n in targets for g in ops.REGISTRY[n.op].kernel_groups})
        raise SpecError(f"--kernel {pattern}={kernel}: the pattern matches no layer of this model",
                        hint=(f"layers with a kernel: {shown}; patterns: a glob over these paths, or "
                              f"{', '.join(f'`{g}`' for g in groups)}") if targets
                        else "this model has no layer whose kernel can be chosen")


def _header(graph: Graph, params: dict[str, Any]) -> list[str]:
    lines = ["Spec parameters:"]
    lines += [f"    {k} = {v!r}" for k, v in params.items()]
    # kernel group -> (what, kernel, reason) -> layers; `what` names the mixer where a group holds several
    kernels: dict[str, dict[tuple, int]] = {group: {} for group in _KERNEL_HEADINGS}
    for node in graph.nodes():
        op = ops.REGISTRY[node.op]
        if op.kernel_family:
            group, what = op.kernel_groups[0], op.kernel_groups[-1]
            key = (f"{what}: " if what != group else "", node.attrs["kernel"], node.attrs["kernel_reason"])
            kernels[group][key] = kernels[group].get(key, 0) + 1
    for group, heading in _KERNEL_HEADINGS.items():
        if kernels[group]:
            lines += ["", heading]
            lines += [f"    {what}{kernel} for {count} layer(s): {reason}"
                      for (what, kernel, reason), count in kernels[group].items()]
    lines += ["", f"Parameters: {analysis.total_params(graph):,}"]
    return lines


_KERNEL_HEADINGS = {"attention": "Attention kernels:", "mixers": "Mixer kernels:"}


def _attention_summary(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None) -> str:
    """Summary footer: each attention kernel with its reason, and attention FLOPs at T, 2T, 4T
    (windowed attention grows linearly, full attention quadratically)."""
    nodes = [n for n in graph.nodes() if ops.REGISTRY[n.op].kernel_groups == ("attention",)]
    if not nodes:
        return ""
    groups: dict[tuple, int] = {}
    for node in nodes:
        key = (node.attrs["kernel"], node.attrs["kernel_reason"])
        groups[key] = groups.get(key, 0) + 1
    lines = [f"attention kernel    {kernel} for {count} layer(s): {reason}"
             for (kernel, reason), count in groups.items()]

    def flops(t: int) -> int:
        sizes = analysis.sizes_for(graph, batch, t, dims)
        return sum(analysis.node_cost(graph, n, sizes)[1] for n in nodes)

    growth = [flops(seq * f) for f in (1, 2, 4)]
    steps = [f"T={seq}: {analysis.human(growth[0])}"]
    steps += [f"{seq * f}: {analysis.human(g)} (x{g / prev:.2f})" for f, g, prev in zip((2, 4), growth[1:], growth)]
    windowed = sum(ops.REGISTRY[n.op].windowed(n) for n in nodes)
    lines.append(f"attention FLOPs     {', '.join(steps)}; {windowed} windowed (linear in T), "
                 f"{len(nodes) - windowed} full (quadratic in T)")
    return "\n".join(lines) + "\n"


def _lanes_summary(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None) -> str:
    """Summary footer for residual lanes: per region its lanes and rule, the residual sites, the parameters
    and FLOPs the mixing adds, and the lane state each site keeps (n times the plain stream's)."""
    regions = [n for n in graph.nodes() if n.op == "lanes"]
    if not regions:
        return ""
    sizes = analysis.sizes_for(graph, batch, seq, dims)
    sites = [n for n in graph.nodes() if n.op == "lanes_read" and n.attrs["index"] == 0]
    lines = []
    for region in regions:
        a = region.attrs
        mine = [n for n in sites if _region_of(graph, n.id) == region.id]
        params = sum(analysis.node_cost(graph, n, sizes)[0] for n in mine)
        flops = sum(analysis.node_cost(graph, n, sizes)[1] for n in mine)
        n, d = a["n"], region.shape[-1]
        rule = a["rule"] + (f" (Sinkhorn {a['iters']} iterations)" if a["rule"] == "mhc" else "")
        kept = (f"; recompute keeps 1 in {a['segment']} sites' lane states, rebuilding the others in the backward"
                if a["recompute"] else "")
        lines.append(f"residual lanes      {n} lanes, {rule}, {len(mine)} residual sites: "
                     f"+{params:,} parameters, mixing {analysis.human(flops)} FLOPs at B={batch}, T={seq}; "
                     f"stream activations x{n} ({n * d} floats per token per site instead of {d}){kept}")
    return "\n".join(lines) + "\n"


PATCH_MEANS = (1, 2, 4, 4.5, 6, 8)  # mean patch lengths the summary prices a patching model at


def patching_costs(graph: Graph, batch: int, seq: int, mean: float,
                   dims: dict[str, int] | None = None) -> tuple[float, float]:
    """(forward FLOPs per byte, the share of them computed on patches — the latent transformer and the
    projections in and out of it) of a patching model whose patches average `mean` bytes."""
    sizes = analysis.sizes_for(graph, batch, seq, {**(dims or {}), patching.PATCHES: patching.patch_count(seq, mean)})
    total = on_patches = 0
    for node in graph.nodes():
        flops = analysis.node_cost(graph, node, sizes)[1]
        total += flops
        if len(node.shape or ()) > 1 and node.shape[1] == patching.PATCHES:
            on_patches += flops
    return total / (batch * seq), on_patches / total if total else 0.0


def _patching_summary(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None) -> str:
    """Summary footer for byte patching: FLOPs per byte, and the share on patches, by mean patch length (the
    patch count is data-dependent; the table above assumes the rule's own mean, or --dim P=N)."""
    mean = patching.assumed_mean(graph)
    if mean is None:
        return ""
    costs = [(m, *patching_costs(graph, batch, seq, m, dims)) for m in PATCH_MEANS]
    shown = ", ".join(f"{m:g}: {analysis.human(per_byte)} ({share:.0%} on patches)" for m, per_byte, share in costs)
    assumed = dims[patching.PATCHES] if dims and patching.PATCHES in dims else patching.patch_count(seq, mean)
    return (f"byte patching       P={assumed} patches above (mean length {mean:g}); forward FLOPs per byte by mean "
            f"patch length at T={seq}: {shown}\n")


def _region_of(graph: Graph, node_id: str) -> str:
    """The `lanes` node that opened the region a lane site reads."""
    node = graph.node(node_id)
    while node.op != "lanes":
        node = graph.node(graph.args(node.id)[0])
    return node.id


def print_stage(stream=sys.stderr, which: str = "all") -> Callable[[str, Graph], None]:
    """An `on_stage` hook printing the IR after `which` pass (or all), MLIR style."""

    def hook(pass_name: str, graph: Graph) -> None:
        if which in ("all", pass_name):
            stream.write(f"// -----// IR Dump After {pass_name} //----- //\n{graph.to_text()}\n")

    return hook


def dump_stages(directory: str | Path) -> Callable[[str, Graph], None]:
    """An `on_stage` hook writing `NN-pass.ir` files into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counter = [0]

    def hook(pass_name: str, graph: Graph) -> None:
        (directory / f"{counter[0]:02d}-{pass_name}.ir").write_text(graph.to_text())
        counter[0] += 1

    return hook
