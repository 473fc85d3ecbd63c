"""diffusers' SD3Transformer2DModel (random init, save_pretrained) into specs/sd3.arch (SD3's interface
around specs/mmdit.arch's blocks) through archc/interop/families/sd3.py: the same outputs within 1e-4 in
fp32, by `load_hf` and by `archc convert`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SPECS
from safetensors.torch import load_file

from archc.cli import main
from archc.dsl.diagnostics import SpecError
from archc.interop.families.sd3 import SD3
from archc.interop.hf import hf_overrides, load_hf

diffusers = pytest.importorskip("diffusers")

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
    assert overrides == {"patch": 2, "channels": 4, "n_layers": 3, "mmdit.n_heads": 2, "joint_dim": 24,
                         "pooled_dim": 20, "d_model": 32, "mmdit.d_model": 32, "image_height": 8, "image_width": 8,
                         "pos_base": 4, "pos_max": 6}
    compiled, model = load_hf(SPECS / "sd3.arch", tmp_path)
    assert main(["convert", str(SPECS / "sd3.arch"), "--from-hf", str(tmp_path), "-o", str(tmp_path / "w.safetensors")]) == 0
    converted = load_file(tmp_path / "w.safetensors")
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    model.eval()
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 8)
    text, pooled = torch.randn(2, 5, 24), torch.randn(2, 20)
    timestep = torch.tensor([3.0, 871.5])
    with torch.no_grad():
        want = theirs(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=timestep).sample
        ours = model(latents, timestep, text, pooled)["sample"]
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
