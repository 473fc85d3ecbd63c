"""Diffusion: images to patch tokens and back, time and 2-D position embeddings, the training objective
and condition dropout. Each op calls the runtime of docs/diffusion.md (archc/runtime/diffusion.py).

- `patchify(image, size=p)`: [B, C, H, W] -> [B, (H/p)(W/p), p·p·C] (DiT's patch order);
  `unpatchify(x, like=image, size=p)` inverts it into the shape of `like`, or with `channels=` into
  that many channels at `like`'s height and width (DiT's learned variance: 2·C).
- `timestep_embedding(t, dim)`: sinusoidal features of the time [B] -> [B, dim] (DiT's defaults).
- `sincos_2d(x, rows=, cols=, base_size=, max_size=)`: DiT's fixed 2-D sin-cos table [N, D] for tokens
  x [B, N, D] on a rows × cols grid (square when left out), to add to x; with `base_size` positions are
  rescaled as diffusers' PatchEmbed does, with `max_size` the table is SD3's centre crop of a
  max_size² one (`pos_embed_max_size`).
- `noisy, t, target = add_noise(image, objective="eps"|"x0"|"v"|"flow", ...)`: three values: the
  noised image, the time the network is given and the objective's regression target;
  `diffusion_loss(pred, target)` is the squared error, averaged per sample then over the batch, in fp32.
- `drop_condition(label, p, null=)`: while training, each sample's label becomes `null` with
  probability p (classifier-free guidance); unchanged in eval.
"""

from __future__ import annotations

import math
from typing import ClassVar

from archc.compiler import dims
from archc.compiler.ops.base import A, OpDef, fmt_shape, register
from archc.compiler.ops.tensor import Part
from archc.dsl.diagnostics import SpecError
from archc.runtime.diffusion import OBJECTIVES, SCHEDULES, TIMESTEP_SAMPLING


def _image(node, shape, what: str):
    if len(shape) != 4:
        raise SpecError(f"{node.op} takes images [B, C, H, W], but the {what} has shape {fmt_shape(shape)}",
                        node.span, hint="declare it as `image: Image[B, 1, 8, 8]`")
    b, c, h, w = shape
    if not all(isinstance(d, int) for d in (c, h, w)):
        raise SpecError(f"{node.op} needs the channels, height and width as numbers, got {fmt_shape(shape)}",
                        node.span, hint="give them by parameters: `Image[B, channels, size, size]`")
    return b, c, h, w


def _grid(node, h: int, w: int, p: int) -> tuple[int, int]:
    if h % p or w % p:
        raise SpecError(f"{node.op}: a {h}×{w} image does not split into {p}×{p} patches", node.span,
                        hint="choose a patch size that divides both the height and the width")
    return h // p, w // p


@register
class Patchify(OpDef):
    name = "patchify"
    inputs = ("image",)
    attrs = {"size": A(int, positive=True)}

    def infer(self, node, ins, graph):
        b, c, h, w = _image(node, ins[0], "image")
        p = node.attrs["size"]
        rows, cols = _grid(node, h, w, p)
        return (b, rows * cols, p * p * c)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = AF.patchify({args[0]}, {node.attrs['size']!r})"]


@register
class Unpatchify(OpDef):
    name = "unpatchify"
    inputs = ("x", "like")
    attrs = {"size": A(int, positive=True), "channels": A((int, type(None)), None, positive=True)}

    def _shape(self, node, like):
        b, c, h, w = _image(node, like, "image it is shaped `like`")
        return b, node.attrs["channels"] or c, h, w

    def infer(self, node, ins, graph):
        x, like = ins
        b, c, h, w = self._shape(node, like)
        p = node.attrs["size"]
        rows, cols = _grid(node, h, w, p)
        want = (b, rows * cols, p * p * c)
        if len(x) != 3 or not all(dims.same(a, e) for a, e in zip(x, want)):
            raise SpecError(f"unpatchify: tokens {fmt_shape(x)} are not the {rows}×{cols} grid of {p}×{p} patches "
                            f"of {c} channels of an image {fmt_shape((b, c, h, w))}; expected {fmt_shape(want)}",
                            node.span)
        return (b, c, h, w)

    def forward(self, node, args, out, mod, ins):
        _b, c, h, w = self._shape(node, ins[1])
        return [f"{out} = AF.unpatchify({args[0]}, {node.attrs['size']!r}, {c!r}, {h!r}, {w!r})"]


@register
class TimestepEmbedding(OpDef):
    name = "timestep_embedding"
    inputs = ("t",)
    attrs = {"dim": A(int, positive=True), "flip_sin_to_cos": A(bool, True), "downscale_freq_shift": A(float, 0.0),
             "scale": A(float, 1.0), "max_period": A(float, 10000.0, positive=True)}

    def infer(self, node, ins, graph):
        if len(ins[0]) != 1:
            raise SpecError(f"timestep_embedding takes one time per sample, shape [B], got {fmt_shape(ins[0])}",
                            node.span)
        return (ins[0][0], node.attrs["dim"])

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        return [f"{out} = AF.timestep_embedding({args[0]}, {a['dim']!r}, flip_sin_to_cos={a['flip_sin_to_cos']!r}, "
                f"downscale_freq_shift={a['downscale_freq_shift']!r}, scale={a['scale']!r}, "
                f"max_period={a['max_period']!r})"]


@register
class SinCos2D(OpDef):
    name = "sincos_2d"
    inputs = ("x",)
    attrs = {"rows": A((int, type(None)), None, positive=True), "cols": A((int, type(None)), None, positive=True),
             "base_size": A((int, type(None)), None, positive=True),
             "max_size": A((int, type(None)), None, positive=True)}

    def _grid(self, node, shape) -> tuple[int, int]:
        if len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
            raise SpecError(f"sincos_2d takes tokens [B, N, D] with N and D numbers, got {fmt_shape(shape)}",
                            node.span)
        n, d = shape[1], shape[2]
        if d % 4:
            raise SpecError(f"sincos_2d needs a width divisible by 4, got {d}", node.span)
        rows, cols = node.attrs["rows"], node.attrs["cols"]
        if rows is None and cols is None:
            rows = cols = math.isqrt(n)
        elif rows is None or cols is None:
            raise SpecError("sincos_2d: give both `rows` and `cols`, or neither for a square grid", node.span)
        if rows * cols != n:
            raise SpecError(f"sincos_2d: {n} tokens are not a {rows}×{cols} grid", node.span,
                            hint="give the patch grid: sincos_2d(x, rows=..., cols=...)")
        big = node.attrs["max_size"]
        if big is not None and (rows > big or cols > big):
            raise SpecError(f"sincos_2d: a {rows}×{cols} grid does not fit the {big}×{big} table it is cropped "
                            "from (max_size)", node.span)
        return rows, cols

    def infer(self, node, ins, graph):
        self._grid(node, ins[0])
        return tuple(ins[0][1:])

    def forward(self, node, args, out, mod, ins):
        rows, cols = self._grid(node, ins[0])
        width, base, big = ins[0][2], node.attrs["base_size"], node.attrs["max_size"]
        scaled = f", base_size={base!r}" if base is not None else ""
        if big is None:
            return [f"{out} = AF.sincos_2d_position_embedding({width!r}, ({rows!r}, {cols!r}){scaled}).to({args[0]})"]
        return [f"{out} = AF.sincos_2d_position_embedding({width!r}, {big!r}{scaled})  # SD3: a centre crop",
                f"{out} = AF.crop_position_embedding({out}, {big!r}, {rows!r}, {cols!r}).to({args[0]})"]


@register
class AddNoise(Part):
    """`noisy, t, target = add_noise(image, ...)`: one draw of times and noise per call."""

    name = "add_noise"
    inputs = ("image",)
    attrs = {"objective": A(str, "eps", choices=OBJECTIVES), "schedule": A(str, "linear", choices=SCHEDULES),
             "steps": A(int, 1000, positive=True), "sampling": A(str, "logit_normal", choices=TIMESTEP_SAMPLING),
             "shift": A(float, 1.0, positive=True)}
    pure = False
    random = True
    several: ClassVar[bool] = True

    def parts(self, values, call):
        return 3

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "float":
            raise SpecError("add_noise takes a float image", span)
        return "float"

    def infer(self, node, ins, graph):
        image = ins[0]
        if len(image) < 2:
            raise SpecError(f"add_noise takes data [B, ...], got {fmt_shape(image)}", node.span)
        if node.attrs["objective"] != "flow" and node.attrs["steps"] < 20:
            raise SpecError("add_noise: a DDPM schedule needs at least 20 steps", node.span)
        return (image[0],) if node.attrs["index"] == 1 else image

    def whole(self, node, args, ins):
        a = node.attrs
        if a["objective"] == "flow":
            options = f"timestep_sampling={a['sampling']!r}, shift={a['shift']!r}"
        else:
            options = f"schedule={a['schedule']!r}, num_timesteps={a['steps']!r}"
        return f"AF.noise_for_training({args[0]}, AF.named_objective({a['objective']!r}, {options}))"


@register
class DiffusionLoss(OpDef):
    name = "diffusion_loss"
    inputs = ("pred", "target")
    attrs = {}
    is_loss = True

    def infer(self, node, ins, graph):
        pred, target = ins
        if len(pred) != len(target) or len(pred) < 2 or not all(dims.same(a, b) for a, b in zip(pred, target)):
            raise SpecError(f"diffusion_loss compares a prediction with its target of one shape [B, ...], got "
                            f"{fmt_shape(pred)} and {fmt_shape(target)}", node.span,
                            hint="the network must output one value per input value (unpatchify its tokens)")
        return ()

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = AF.mean_flat_loss({args[0]}, {args[1]})"]


@register
class DropCondition(OpDef):
    name = "drop_condition"
    inputs = ("condition",)
    attrs = {"p": A(float, unit=True), "null": A(int)}
    pure = False
    random = True

    def dtype(self, attrs, dtypes, span):
        return dtypes[0]

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        return [f"{out} = AF.drop_condition({args[0]}, {a['p']!r}, {a['null']!r}) if self.training else {args[0]}"]
