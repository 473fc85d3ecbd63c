"""Tensors that move: indexing and slicing, concat / stack / split / chunk, unsqueeze / squeeze, reshape /
flatten, transpose / permute, expand, shift and where.

Each op checks the shapes it receives with the symbolic-shape arithmetic of archc/compiler/dims.py and
says which dim is wrong: a concat along 1 of [B, N, D] and [B, L, D] is [B, L + N, D], and a split of it
into [N, L] gives back [B, N, D] and [B, L, D]; sizes the spec writes (`T - 1`, `N + L`, `B`) are
read from the tensors that carry them. Axes are numbers (negative from the end) or named by a dim
(`dim=T`). `split` and `chunk` give several values: one node per value, which code generation binds in
one line (`shift, scale, gate = m.chunk(3, dim=-1)`).
"""

from __future__ import annotations

from typing import ClassVar

from archc.compiler import dims
from archc.compiler.dims import Poly, Size, resolve
from archc.compiler.ops.base import A, OpDef, axis_of, dim_arg, fmt_shape, register
from archc.compiler.ops.elementwise import broadcast
from archc.dsl.diagnostics import SpecError


class Move(OpDef):
    """An op that moves elements without changing them: the value keeps its dtype."""

    def dtype(self, attrs, dtypes, span):
        return dtypes[0]


def _size_code(value, args, ins) -> str:
    return value.code(args, ins) if isinstance(value, Size) else repr(value)


def _joined(dtypes: list[str], span, what: str) -> str:
    if len(set(dtypes)) == 1:
        return dtypes[0]
    if "bool" in dtypes:
        raise SpecError(f"{what} cannot mix masks (true/false) with numbers", span)
    return "float"


# ---- indexing -----------------------------------------------------------------


@register
class Index(Move):
    """`x[i, a:b:s, ...]`: `items` are ["at", i], ["slice", start, stop, step] (None where left out) or ["..."];
    positions are ints (negative from the end) or sizes."""

    name = "index"
    attrs = {"items": A(list)}
    user = False

    def _axes(self, node, shape):
        """(item, axis) pairs; axes no item names stay whole."""
        items = node.attrs["items"]
        used = sum(1 for item in items if item[0] != "...")
        if used > len(shape):
            raise SpecError(f"{used} positions index a tensor of shape {fmt_shape(shape)} ({len(shape)} axes)",
                            node.span)
        out, axis = [], 0
        for item in items:
            if item[0] == "...":
                axis += len(shape) - used
                continue
            out.append((item, axis))
            axis += 1
        return out

    def infer(self, node, ins, graph):
        shape = ins[0]
        keep = list(shape)
        drop = set()
        for item, axis in self._axes(node, shape):
            d = shape[axis]
            if item[0] == "at":
                pos = resolve(item[1], ins)
                past = Poly.parse(pos) - Poly.parse(d) if not (isinstance(pos, int) and pos < 0) \
                    else -(Poly.parse(pos) + Poly.parse(d)) - Poly.const(1)
                if past.constant is not None and past.constant >= 0:
                    raise SpecError(f"position {pos} is outside axis {axis} of {fmt_shape(shape)} (size {d})",
                                    node.span)
                drop.add(axis)
            else:
                keep[axis] = self._length(node, d, axis, shape, *(resolve(p, ins) for p in item[1:]))
        return tuple(size for i, size in enumerate(keep) if i not in drop)

    @staticmethod
    def _bound(node, value, d, axis, shape, default):
        """A slice bound as a polynomial position in [0, d] (negative ints count from the end)."""
        if value is None:
            return Poly.parse(default)
        given = value
        if isinstance(value, int) and value < 0:
            value = dims.add(d, value)
        past = Poly.parse(value) - Poly.parse(d)
        if past.constant is not None and past.constant > 0:
            raise SpecError(f"slice bound {given} is past the end of axis {axis} of {fmt_shape(shape)} (size {d})",
                            node.span)
        before = Poly.parse(value).constant
        if before is not None and before < 0:
            raise SpecError(f"slice bound {given} is before the start of axis {axis} of {fmt_shape(shape)} (size {d})",
                            node.span)
        return Poly.parse(value)

    def _length(self, node, d, axis, shape, start, stop, step):
        a = self._bound(node, start, d, axis, shape, 0)
        b = self._bound(node, stop, d, axis, shape, d)
        length = b - a
        if length.constant is not None and length.constant < 0:
            raise SpecError(f"the slice {self._show(start, stop, step)} of axis {axis} (size {d}) is empty",
                            node.span)
        step = step or 1
        if step == 1:
            return length.dim()
        if length.constant is not None:
            return -(-int(length.constant) // step)
        quotient = length.divide(Poly.const(step))
        raise SpecError(f"cannot tell how long the slice {self._show(start, stop, step)} of the symbolic axis {d} is"
                        + ("" if quotient is None else f" (about {quotient.dim()})"), node.span,
                        hint="strided slices need an axis of known size")

    @staticmethod
    def _show(start, stop, step) -> str:
        return ":".join("" if p is None else str(p) for p in (start, stop, step))

    def forward(self, node, args, out, mod, ins):
        shape = ins[0]
        axes = dict((id(item), axis) for item, axis in self._axes(node, shape))
        parts = []
        for item in node.attrs["items"]:
            if item[0] == "...":
                parts.append("...")
            elif item[0] == "at":
                parts.append(_size_code(item[1], args, ins))
            else:
                parts.append(self._slice_code(item[1:], shape[axes[id(item)]], args, ins))
        while parts and parts[-1] == ":":
            parts.pop()
        return [f"{out} = {args[0]}[{', '.join(parts) or '...'}]"]

    @staticmethod
    def _slice_code(part, d, args, ins) -> str:
        start, stop, step = part
        text = []
        for value, whole in ((start, 0), (stop, d)):
            resolved = resolve(value, ins)
            if value is None or dims.same(resolved, whole):
                text.append("")
                continue
            back = Poly.parse(resolved) - Poly.parse(d)  # a bound k before the end reads best as -k
            if not isinstance(d, int) and back.constant is not None and back.constant < 0:
                text.append(str(int(back.constant)))
            else:
                text.append(_size_code(value, args, ins))
        code = ":".join(text)
        return code + (f":{step}" if step not in (None, 1) else "")


# ---- joining and splitting -------------------------------------------------------


@register
class Concat(OpDef):
    name = "concat"
    inputs = ("tensors",)
    list_input = "tensors"
    attrs = {"dim": dim_arg(-1)}

    def dtype(self, attrs, dtypes, span):
        return _joined(dtypes, span, "concat")

    def infer(self, node, ins, graph):
        shapes = ins[:node.attrs["count"]]
        first = shapes[0]
        axis = axis_of(node, first, node.attrs["dim"], ins)
        for i, shape in enumerate(shapes[1:], 1):
            if len(shape) != len(first):
                raise SpecError(f"concat needs tensors of one rank: {fmt_shape(first)} and {fmt_shape(shape)}",
                                node.span)
            for j, (a, b) in enumerate(zip(first, shape)):
                if j != axis and not dims.same(a, b):
                    raise SpecError(f"concat along {axis} needs equal dims elsewhere, but tensor {i} has shape "
                                    f"{fmt_shape(shape)} against {fmt_shape(first)}: dim {j} differs ({b} vs {a})",
                                    node.span)
        total = first[axis]
        for shape in shapes[1:]:
            total = dims.add(total, shape[axis])
        return (*first[:axis], total, *first[axis + 1:])

    def forward(self, node, args, out, mod, ins):
        tensors = args[:node.attrs["count"]]
        dim = axis_of(node, ins[0], node.attrs["dim"], ins, code=True)
        return [f"{out} = torch.cat([{', '.join(tensors)}], dim={dim})"]


@register
class Stack(OpDef):
    name = "stack"
    inputs = ("tensors",)
    list_input = "tensors"
    attrs = {"dim": A(int, 0)}

    def dtype(self, attrs, dtypes, span):
        return _joined(dtypes, span, "stack")

    def infer(self, node, ins, graph):
        shapes = ins[:node.attrs["count"]]
        for i, shape in enumerate(shapes[1:], 1):
            if len(shape) != len(shapes[0]) or not all(dims.same(a, b) for a, b in zip(shape, shapes[0])):
                raise SpecError(f"stack needs tensors of one shape, but tensor {i} has shape {fmt_shape(shape)} "
                                f"against {fmt_shape(shapes[0])}", node.span)
        axis = axis_of(node, shapes[0], node.attrs["dim"], ins, extra=1)
        first = shapes[0]
        return (*first[:axis], len(shapes), *first[axis:])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = torch.stack([{', '.join(args[:node.attrs['count']])}], dim={node.attrs['dim']!r})"]


class Part(Move):
    """One of the values of `split` / `chunk` (attribute `index`); code generation writes the values a
    call gives in one line."""

    several: ClassVar[bool] = True

    def whole(self, node, args, ins) -> str:
        """The call that gives every part, as Python."""
        raise NotImplementedError

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {self.whole(node, args, ins)}[{node.attrs['index']!r}]"]


@register
class Split(Part):
    name = "split"
    attrs = {"sizes": A(list), "dim": dim_arg(-1)}

    def parts(self, values, call):
        return len(values["sizes"]) if isinstance(values["sizes"], list) else None

    def infer(self, node, ins, graph):
        shape = ins[0]
        axis = axis_of(node, shape, node.attrs["dim"], ins)
        sizes = resolve(node.attrs["sizes"], ins)
        if not sizes:
            raise SpecError("split needs at least one size", node.span)
        for size in sizes:
            if isinstance(size, int) and size <= 0:
                raise SpecError(f"split sizes must be positive, got {size}", node.span)
        total = sizes[0]
        for size in sizes[1:]:
            total = dims.add(total, size)
        if not dims.same(total, shape[axis]):
            raise SpecError(f"split sizes {fmt_shape(sizes)} add up to {total}, but axis {axis} of {fmt_shape(shape)} "
                            f"has size {shape[axis]}", node.span)
        return (*shape[:axis], sizes[node.attrs["index"]], *shape[axis + 1:])

    def whole(self, node, args, ins):
        sizes = ", ".join(_size_code(s, args, ins) for s in node.attrs["sizes"])
        dim = axis_of(node, ins[0], node.attrs["dim"], ins, code=True)
        return f"{args[0]}.split([{sizes}], dim={dim})"


@register
class Chunk(Part):
    name = "chunk"
    attrs = {"chunks": A(int, positive=True), "dim": dim_arg(-1)}

    def parts(self, values, call):
        n = values["chunks"]
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def infer(self, node, ins, graph):
        shape = ins[0]
        axis = axis_of(node, shape, node.attrs["dim"], ins)
        n, d = node.attrs["chunks"], shape[axis]
        part = dims.div(d, n)
        if part is None or (isinstance(d, int) and d % n):
            raise SpecError(f"chunk({n}) needs an axis it divides, but axis {axis} of {fmt_shape(shape)} has size {d}",
                            node.span)
        return (*shape[:axis], part, *shape[axis + 1:])

    def whole(self, node, args, ins):
        dim = axis_of(node, ins[0], node.attrs["dim"], ins, code=True)
        return f"{args[0]}.chunk({node.attrs['chunks']!r}, dim={dim})"


@register
class TopK(Part):
    """`values, indices = topk(x, k, dim=-1)`: the k largest along `dim`, largest first, and their positions."""

    name = "topk"
    attrs = {"k": A((int, Size), positive=True), "dim": dim_arg(-1)}

    def parts(self, values, call):
        return 2

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] == "bool":
            raise SpecError("`topk` ranks numbers, and this tensor holds true/false", span)
        return "long" if attrs.get("index") == 1 else dtypes[0]

    def infer(self, node, ins, graph):
        shape = ins[0]
        axis = axis_of(node, shape, node.attrs["dim"], ins)
        k = resolve(node.attrs["k"], ins)
        if isinstance(k, int) and isinstance(shape[axis], int) and k > shape[axis]:
            raise SpecError(f"topk({k}) of axis {axis} of {fmt_shape(shape)}: only {shape[axis]} to choose from",
                            node.span)
        return (*shape[:axis], k, *shape[axis + 1:])

    def whole(self, node, args, ins):
        dim = axis_of(node, ins[0], node.attrs["dim"], ins, code=True)
        return f"{args[0]}.topk({_size_code(node.attrs['k'], args, ins)}, dim={dim})"


@register
class Gather(OpDef):
    """torch.gather: out[..., i, ...] = x[..., index[..., i, ...], ...] along `dim`; `index` has x's rank
    and x's dims on every other axis (expand it first), and the result has index's shape."""

    name = "gather"
    inputs = ("x", "index")
    attrs = {"dim": dim_arg(-1)}

    def dtype(self, attrs, dtypes, span):
        if dtypes[1] != "long":
            raise SpecError("the `index` of `gather` holds positions (Tokens), as `topk` and `arange` give", span)
        return dtypes[0]

    def infer(self, node, ins, graph):
        x, index = ins
        axis = axis_of(node, x, node.attrs["dim"], ins)
        if len(index) != len(x):
            raise SpecError(f"gather needs an index of x's rank: x is {fmt_shape(x)}, index {fmt_shape(index)}",
                            node.span, hint="add axes with unsqueeze, then expand")
        for i, (a, b) in enumerate(zip(x, index)):
            if i != axis and not dims.same(a, b):
                raise SpecError(f"gather along {axis}: the index's other axes must be x's, but axis {i} is {b} "
                                f"in the index and {a} in x ({fmt_shape(index)} vs {fmt_shape(x)})", node.span,
                                hint="expand the index to x's sizes on the other axes")
        return index

    def forward(self, node, args, out, mod, ins):
        dim = axis_of(node, ins[0], node.attrs["dim"], ins, code=True)
        return [f"{out} = torch.gather({args[0]}, {dim}, {args[1]})"]


# ---- axes ---------------------------------------------------------------------------


@register
class Unsqueeze(Move):
    name = "unsqueeze"
    attrs = {"dim": A(int)}

    def infer(self, node, ins, graph):
        axis = axis_of(node, ins[0], node.attrs["dim"], ins, extra=1)
        return (*ins[0][:axis], 1, *ins[0][axis:])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.unsqueeze({node.attrs['dim']!r})"]


@register
class Squeeze(Move):
    name = "squeeze"
    attrs = {"dim": dim_arg()}

    def infer(self, node, ins, graph):
        axis = axis_of(node, ins[0], node.attrs["dim"], ins)
        if ins[0][axis] != 1:
            raise SpecError(f"squeeze removes an axis of size 1, but axis {axis} of {fmt_shape(ins[0])} has size "
                            f"{ins[0][axis]}", node.span)
        return (*ins[0][:axis], *ins[0][axis + 1:])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.squeeze({axis_of(node, ins[0], node.attrs['dim'], ins, code=True)})"]


@register
class Reshape(Move):
    name = "reshape"
    attrs = {"shape": A(list)}

    def infer(self, node, ins, graph):
        want = resolve(node.attrs["shape"], ins)
        if not want:
            raise SpecError("reshape needs a shape with at least one axis", node.span)
        free = [i for i, d in enumerate(want) if d == -1]
        if len(free) > 1:
            raise SpecError(f"reshape to {fmt_shape(want)}: at most one -1", node.span)
        if any(isinstance(d, int) and d <= 0 and d != -1 for d in want):
            raise SpecError(f"reshape to {fmt_shape(want)}: sizes must be positive (or one -1)", node.span)
        total = dims.product(ins[0])
        known = dims.product(d for d in want if d != -1)
        if free:
            rest = dims.div(total, known)
            if rest is None:
                raise SpecError(f"cannot reshape {fmt_shape(ins[0])} ({total} elements) to {fmt_shape(want)}: "
                                f"{known} does not divide {total}", node.span)
            want = [rest if d == -1 else d for d in want]
        elif not dims.same(total, known):
            raise SpecError(f"cannot reshape {fmt_shape(ins[0])} ({total} elements) to {fmt_shape(want)} "
                            f"({known} elements)", node.span)
        return tuple(want)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.reshape({', '.join(_size_code(d, args, ins) for d in node.attrs['shape'])})"]


@register
class Flatten(Move):
    name = "flatten"
    attrs = {"start": A(int, 0), "end": A(int, -1)}

    def infer(self, node, ins, graph):
        shape = ins[0]
        a = axis_of(node, shape, node.attrs["start"], ins)
        b = axis_of(node, shape, node.attrs["end"], ins)
        if a > b:
            raise SpecError(f"flatten: start axis {a} comes after end axis {b} of {fmt_shape(shape)}", node.span)
        return (*shape[:a], dims.product(shape[a:b + 1]), *shape[b + 1:])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.flatten({node.attrs['start']!r}, {node.attrs['end']!r})"]


@register
class Transpose(Move):
    name = "transpose"
    attrs = {"a": A(int), "b": A(int)}

    def infer(self, node, ins, graph):
        shape = list(ins[0])
        a, b = (axis_of(node, ins[0], node.attrs[k], ins) for k in ("a", "b"))
        shape[a], shape[b] = shape[b], shape[a]
        return tuple(shape)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.transpose({node.attrs['a']!r}, {node.attrs['b']!r})"]


@register
class Permute(Move):
    name = "permute"
    attrs = {"dims": A(list)}

    def infer(self, node, ins, graph):
        order = [axis_of(node, ins[0], d, ins) for d in node.attrs["dims"]]
        if sorted(order) != list(range(len(ins[0]))):
            raise SpecError(f"permute needs each of the {len(ins[0])} axes of {fmt_shape(ins[0])} once, got "
                            f"{node.attrs['dims']!r}", node.span)
        return tuple(ins[0][i] for i in order)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.permute({', '.join(repr(d) for d in node.attrs['dims'])})"]


@register
class Expand(Move):
    """Size-1 axes repeated to `shape` (new leading axes allowed; -1 keeps an axis), without copying."""

    name = "expand"
    attrs = {"shape": A(list)}

    def infer(self, node, ins, graph):
        shape, want = ins[0], resolve(node.attrs["shape"], ins)
        if len(want) < len(shape):
            raise SpecError(f"expand to {fmt_shape(want)} has fewer axes than {fmt_shape(shape)}", node.span)
        out = list(want[:len(want) - len(shape)])
        if -1 in out:
            raise SpecError(f"expand to {fmt_shape(want)}: a new axis needs a size, not -1", node.span)
        for i, (have, new) in enumerate(zip(shape, want[len(want) - len(shape):])):
            if new == -1 or dims.same(have, new):
                out.append(have)
            elif have == 1:
                out.append(new)
            else:
                axis = len(want) - len(shape) + i
                raise SpecError(f"expand repeats axes of size 1, but axis {axis} of {fmt_shape(shape)} has size "
                                f"{have}, not {new}", node.span)
        return tuple(out)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.expand({', '.join(_size_code(d, args, ins) for d in node.attrs['shape'])})"]


# ---- shift and where -------------------------------------------------------------------


@register
class Shift(Move):
    """Positions moved n later along `dim` (earlier for n < 0), the vacated ones set to `fill`."""

    name = "shift"
    attrs = {"n": A(int), "dim": dim_arg(1), "fill": A((int, float), 0)}

    def infer(self, node, ins, graph):
        axis = axis_of(node, ins[0], node.attrs["dim"], ins)
        d = ins[0][axis]
        if isinstance(d, int) and abs(node.attrs["n"]) > d:
            raise SpecError(f"shift by {node.attrs['n']} is longer than axis {axis} of {fmt_shape(ins[0])}", node.span)
        return ins[0]

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        dim = axis_of(node, ins[0], a["dim"], ins, code=True)
        return [f"{out} = AF.shift({args[0]}, {a['n']!r}, dim={dim}, fill={a['fill']!r})"]


@register
class Where(OpDef):
    """`a` where the mask `cond` holds, else `b`; `a` and `b` are tensors or numbers, all broadcast."""

    name = "where"
    inputs = ("cond", "a", "b")
    number_inputs = frozenset({"a", "b"})
    attrs = {}

    def _values(self, node, args):
        """The Python text of a and b (a tensor's name or a number), in order."""
        rest = iter(args[1:])
        return [repr(node.attrs[k]) if k in node.attrs else next(rest) for k in ("a", "b")]

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "bool":
            raise SpecError("`where` needs a mask (true/false) as its condition, as comparisons give", span,
                            hint="compare first: where(ids == -100, 0, ids)")
        kinds = list(dtypes[1:]) + ["float" if isinstance(attrs[k], float) else "long" for k in ("a", "b")
                                    if k in attrs]
        return _joined(kinds, span, "where")

    def infer(self, node, ins, graph):
        out = ins[0]
        for shape in ins[1:]:
            out = broadcast(node, out, shape, "choose between")
        return out

    def forward(self, node, args, out, mod, ins):
        a, b = self._values(node, args)
        return [f"{out} = torch.where({args[0]}, {a}, {b})"]
