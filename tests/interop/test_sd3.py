"""diffusers' SD3Transformer2DModel (random init, save_pretrained) into the blocks of specs/mmdit.arch
through archc/interop/families/sd3.py: the same outputs within 1e-4 in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SPECS
from safetensors.torch import load_file

import archc
from archc.dsl.diagnostics import SpecError
from archc.interop.families.sd3 import SD3
from archc.interop.hf import convert_state_dict, expected_weights, hf_overrides
from archc.interop.weights import load_canonical

diffusers = pytest.importorskip("diffusers")

# specs/mmdit.arch's blocks under SD3's interface: latents, timestep, text encoder tokens and pooled vector
SD3_MODEL = """
param joint_dim: int = 24
param pooled_dim: int = 20
param pos_base: int = 4
param pos_max: int = 4

model SD3(hidden_states: Image[B, channels, image_height, image_width], timestep: Tensor[B],
          encoder_hidden_states: Tensor[B, L, joint_dim], pooled_projections: Tensor[B, pooled_dim]) {
    x = transpose(flatten(conv2d(hidden_states, d_model, patch, stride=patch) as pos_embed, 2), 1, 2)
    x = x + sincos_2d(x, rows=image_height // patch, cols=image_width // patch, base_size=pos_base, max_size=pos_max)
    context = linear(encoder_hidden_states, d_model) as context_embedder
    t_emb = linear(silu(linear(timestep_embedding(timestep, freq_dim), d_model) as time_linear_1), d_model)
        as time_linear_2
    c = t_emb + linear(silu(linear(pooled_projections, d_model) as text_linear_1), d_model) as text_linear_2
    repeat i in 0..n_layers as transformer_blocks {
        if i < n_layers - 1 {
            x, context = JointBlock(x, context, c)
        } else {
            x = LastJointBlock(x, context, c)
        }
    }
    scale, shift = chunk(linear(silu(c), 2 * d_model) as norm_out, 2, dim=-1)
    x = Modulate(layer_norm(x, eps=1e-6, affine=false), shift, scale)
    return unpatchify(linear(x, patch * patch * channels) as proj_out, like=hidden_states, size=patch)
}
"""


def _sd3_spec() -> str:
    blocks = (SPECS / "mmdit.arch").read_text().split("\nmodel MMDiT(")[0]
    return blocks + SD3_MODEL


CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
              pos_embed_max_size=6)


def test_sd3_weights_give_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    theirs = diffusers.SD3Transformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight matter
        for weight in theirs.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    overrides = hf_overrides(SD3, config)
    assert overrides == {"patch": 2, "channels": 4, "n_layers": 3, "n_heads": 2, "joint_dim": 24, "pooled_dim": 20,
                         "d_model": 32, "image_height": 8, "image_width": 8, "pos_base": 4, "pos_max": 6}
    compiled = archc.compile(_sd3_spec(), overrides, name="sd3.arch")
    model = compiled.build()
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    canonical = convert_state_dict(SD3, state, expect=expected_weights(compiled, model), params=compiled.params)
    load_canonical(model, compiled, canonical)
    model.eval()
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 8)
    text, pooled = torch.randn(2, 5, 24), torch.randn(2, 20)
    timestep = torch.tensor([3.0, 871.5])
    with torch.no_grad():
        want = theirs(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=timestep).sample
        ours = model(latents, timestep, text, pooled)["out0"]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value, words", [
    ("qk_norm", "rms_norm", "no QK-norm"),
    ("dual_attention_layers", [0], "one attention"),
    ("caption_projection_dim", 48, "as wide as the image stream"),
    ("out_channels", 8, "as many channels as it is given"),
])
def test_sd3_configs_the_spec_cannot_represent_are_refused(field, value, words):
    with pytest.raises(SpecError) as info:
        hf_overrides(SD3, {**CONFIG, field: value})
    assert field in str(info.value) and words in str(info.value)
