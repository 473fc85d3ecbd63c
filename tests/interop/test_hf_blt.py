"""transformers' Byte Latent Transformer (BltForCausalLM, with its entropy patcher) loads into specs/blt.arch:
the entropy model gives the same patch boundaries, and with the same boundaries the byte logits are
transformers'. Exported back, transformers loads the same model.

Small random checkpoints (no download, eager attention, fp32) saved with `save_pretrained`; norms and
vectors randomised (hf_checkpoints.randomise), the patcher's head scaled so that its entropies spread
out, and the threshold put halfway between two of them near their median (no entropy close to it, so
rounding cannot move a boundary), which gives patches of several lengths. Two latent widths: one with
a projection into the latent transformer, one (as BLT-1B) where dim_local · cross_attn_k is its width.
"""

import pytest
import torch
from hf_checkpoints import SPECS, randomise
from safetensors.torch import load_file

from archc.dsl.diagnostics import SpecError
from archc.interop.families.blt import NO_LIMIT
from archc.interop.hf import hf_overrides, load_hf, read_config, save_hf

transformers = pytest.importorskip("transformers")

SPEC = SPECS / "blt.arch"
T = 23
# not blt_entropy.arch's defaults: the map sizes the used entropy spec (-D blt_entropy.e_dim=48 ...)
ENTROPY_MODEL = {"hidden_size": 48, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 100}


def _config(d_global: int, **top):
    local = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48}
    return transformers.BltConfig(
        encoder_hash_byte_group_vocab=31, local_attention_window_len=6, cross_attn_k=2,
        encoder_config={**local, "num_hidden_layers": 2, "cross_attn_k": 2},
        decoder_config={**local, "num_hidden_layers": 2, "cross_attn_k": 2, "hidden_size_global": d_global},
        global_config={"hidden_size": d_global, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "intermediate_size": 96},
        patcher_config=ENTROPY_MODEL, attn_implementation="eager", **top)


def _bytes(B=2, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[48, 64], ids=["projected", "unprojected"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(request.param)
    hf = transformers.BltForCausalLM(_config(request.param)).eval()
    randomise(hf, sharpen=2.0)
    with torch.no_grad():
        hf.model.patcher.lm_head.weight.mul_(30.0)
        entropies, _, _ = hf.model.patcher(_bytes() + 4, patch_size=4, threshold=0.0)
    # halfway between two entropies near the median (of those deciding positions 2..T), well apart, where the
    # rows get different numbers of patches
    values = entropies[:, 1:].flatten().sort().values
    hf.config.patching_threshold = next(
        threshold for i in range(len(values) // 2, len(values)) if values[i] - values[i - 1] > 1e-3 * values[i]
        and len(set(((entropies[:, 1:] > (threshold := float(values[i - 1] + values[i]) / 2)).sum(1)).tolist())) > 1)
    directory = tmp_path_factory.mktemp(f"blt{request.param}")
    hf.save_pretrained(directory)
    return directory, hf


def _starts(lengths: torch.Tensor) -> list[int]:
    """The positions where patches start (empty patches at the end start nothing)."""
    ends = lengths.cumsum(0)
    return [int(e - n) for e, n in zip(ends, lengths) if n > 0 or e - n == T]


def test_patches_and_logits_match_transformers(checkpoint):
    directory, hf = checkpoint
    compiled, model = load_hf(SPEC, directory)
    assert compiled.params["reference_residual"]
    assert hasattr(model, "token_embedding_projection") is (compiled.params["d_global"] != 64)
    ids = _bytes() + 4
    with torch.no_grad():
        ours = model(ids - 4)
        lengths = ours["lengths"]
        assert len({int((row > 0).sum()) for row in lengths}) > 1  # ragged rows, patches of several lengths
        assert len(set(lengths[lengths > 0].tolist())) > 2
        for b in range(len(ids)):  # transformers' patcher, and its forward patching by it, one row at a time
            _, theirs, _ = hf.model.patcher(ids[b:b + 1], patch_size=4, threshold=hf.config.patching_threshold)
            # the same starts; the spec's lengths also cover the byte after the window (sum T + 1), transformers'
            # end at T (an empty last patch when that byte would start one)
            assert _starts(lengths[b]) == _starts(theirs[0])
            assert int(lengths[b].sum()) == T + 1 and int(theirs.sum()) == T
            logits = hf(ids[b:b + 1], use_cache=False).logits[..., 4:]
            torch.testing.assert_close(ours["logits"][b:b + 1], logits, atol=1e-4, rtol=0)
        # the batch at once, transformers given the spec's boundaries (rows padded with empty patches)
        logits = hf(ids, patch_lengths=lengths, use_cache=False).logits[..., 4:]
    torch.testing.assert_close(ours["logits"], logits, atol=1e-4, rtol=0)


def test_export_round_trip(checkpoint, tmp_path):
    directory, hf = checkpoint
    compiled, model = load_hf(SPEC, directory)
    save_hf(compiled, model, tmp_path, "blt", base_config=read_config(directory))
    original, exported = load_file(directory / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    again = transformers.BltForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _bytes(seed=1) + 4
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, hf(ids, use_cache=False).logits,
                                   atol=0, rtol=0)


def test_what_the_spec_cannot_compute_is_refused():
    good = _config(48).to_dict()
    derived = hf_overrides("blt", good, SPEC)
    assert derived["max_patch_length"] == NO_LIMIT
    assert (derived["blt_entropy.e_dim"], derived["blt_entropy.e_heads"], derived["blt_entropy.e_layers"],
            derived["blt_entropy.e_hidden"]) == (48, 2, 1, 100)
    for change, message in [
        ({"max_patch_length": 8}, "max_patch_length=8"),
        ({"patching_mode": "space"}, "patching_mode='space'"),
        ({"patcher_config": {**good["patcher_config"], "rope_parameters": {"rope_type": "default",
                                                                            "rope_theta": 5000.0}}},
         "patcher_config.rope_theta=5000.0"),
        ({"decoder_config": {**good["decoder_config"], "intermediate_size": 40}},
         "decoder_config.intermediate_size=40"),
        ({"decoder_config": {**good["decoder_config"], "cross_attn_all_layers": False}},
         "decoder_config.cross_attn_all_layers=False"),
        ({"global_config": {**good["global_config"], "num_key_value_heads": 1}},
         "global_config.num_key_value_heads=1"),
        ({"local_attention_window_len": None}, "local_attention_window_len=None"),
        ({"encoder_config": {**good["encoder_config"], "cross_attn_k": 3}}, "encoder_config.cross_attn_k=3"),
        ({"patch_in_forward": False}, "patch_in_forward=False"),
    ]:
        with pytest.raises(SpecError, match="cannot be represented") as info:
            hf_overrides("blt", {**good, **change}, SPEC)
        assert message in str(info.value)
