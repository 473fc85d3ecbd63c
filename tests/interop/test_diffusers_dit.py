"""diffusers' DiTTransformer2DModel, random-init and saved with `save_pretrained`, loads into the model
compiled from specs/dit.arch (its parameters from config.json) and predicts what diffusers predicts for
the same noised images, timesteps and class labels (the null class included), with and without the
learned variance; a checkpoint that does not fit is refused naming the field or tensor."""

import json

import pytest
import torch
from hf_checkpoints import ATOL, SPECS
from safetensors.torch import load_file, save_file

from archc.dsl.diagnostics import SpecError
from archc.interop.hf import load_hf, save_hf
from archc.interop.weights import WeightsError
from archc.runtime.diffusion import given_noise

diffusers = pytest.importorskip("diffusers")

SPEC = SPECS / "dit.arch"
SMALL = {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "num_layers": 3, "sample_size": 8,
         "patch_size": 2, "num_embeds_ada_norm": 10}


def _checkpoint(tmp_path, **config):
    """A diffusers DiT with every weight drawn N(0, 0.1) (its zero-initialised modulation would hide a
    mis-mapped tensor), saved with save_pretrained."""
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(**{**SMALL, **config}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path)
    return model


def _predict(model, x, t, y):
    with torch.no_grad(), given_noise(x, t):
        out = model(image=x, label=y)
    return torch.cat([out["pred"], out["sigma"]], dim=1) if "sigma" in out else out["pred"]


@pytest.mark.parametrize("out_channels", [8, None], ids=["learned_sigma", "eps_only"])
def test_outputs_match_diffusers(tmp_path, out_channels):
    ref = _checkpoint(tmp_path, out_channels=out_channels)
    compiled, model = load_hf(SPEC, tmp_path)
    assert compiled.params["learn_sigma"] is (out_channels == 8)
    assert compiled.params["block_condition"] and compiled.params["d_model"] == 32
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])
    y = torch.tensor([0, 3, 9, 10])  # 10: the null class of classifier-free guidance
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
    got = _predict(model, x, t, y)
    assert want.shape == got.shape == (4, out_channels or 4, 8, 8)
    assert want.abs().max() > 0.5  # the outputs are not trivially zero
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_each_block_uses_its_own_condition_and_the_final_layer_block_zeros(tmp_path):
    """Per-block embeddings are loaded where diffusers keeps them: changing block 1's class table
    changes the output, as it does in diffusers."""
    ref = _checkpoint(tmp_path, out_channels=8)
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    state[key] = state[key] + 0.5
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    ref.load_state_dict(state)
    _compiled, model = load_hf(SPEC, tmp_path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(_predict(model, x, t, y), want, atol=ATOL, rtol=0)


def test_a_checkpoint_that_does_not_fit_names_the_field_or_tensor(tmp_path):
    _checkpoint(tmp_path, out_channels=8)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "out_channels": 3}))
    with pytest.raises(SpecError, match="out_channels"):
        load_hf(SPEC, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_fn": "geglu"}))
    with pytest.raises(SpecError, match="activation_fn"):
        load_hf(SPEC, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    state["proj_out_2.weight"] = state["proj_out_2.weight"][:-1]
    del state["transformer_blocks.0.attn1.to_q.bias"]
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as err:
        load_hf(SPEC, tmp_path)
    assert "transformer_blocks.0.attn1.to_q.bias" in str(err.value)
    del state["proj_out_2.weight"]
    state["transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(32)
    state["proj_out_2.weight"] = torch.zeros(7, 32)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=r"proj_out_2.weight \[7, 32\] -> final_layer.linear.weight"):
        load_hf(SPEC, tmp_path)


def test_export_to_diffusers_is_refused(tmp_path):
    _checkpoint(tmp_path / "in")
    compiled, model = load_hf(SPEC, tmp_path / "in")
    with pytest.raises(SpecError, match="diffusers directories is not built"):
        save_hf(compiled, model, tmp_path / "out", "DiTTransformer2DModel")
