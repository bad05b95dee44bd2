"""Export to SAELens, checked with the real sae-lens: ``SAE.load_from_disk`` on what
``to_saelens`` writes must encode and decode what the DMSAE computes in eval mode, and importing
the export back must give the same DMSAE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig

from modeling_dmsae import DMSAEConfig, DMSAEModel
from modeling_dmsae.convert_checkpoints import DMSAE_METADATA_KEY, from_checkpoint, from_saelens, to_saelens

D, K, CORE, TOPK, TOKENS = 64, 512, 24, 16, 2048


def realistic_activations(seed: int = 0, tokens: int = TOKENS) -> torch.Tensor:
    """Residual-stream-like activations (reference notes, section 4): a mean holding ~40% of
    E||x||^2, heavy-tailed token norms, and attention-sink tokens ~100x the median norm."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=generator) * 0.8
    scale = torch.distributions.LogNormal(0.0, 0.35).sample((tokens, 1))
    x = mean + scale * torch.randn(tokens, D, generator=generator)
    x[:: tokens // 16] *= 100.0  # sinks
    return x * 30.0


def trained_like_dmsae(variant: str, x: torch.Tensor, seed: int = 0) -> DMSAEModel:
    """A DMSAE with the structure of a trained one: unit decoder rows, encoder close to W_dec^T,
    b_dec near the mean, negative b_enc, the normalisation factor sqrt(E||x||^2) and an inference
    threshold at the pre-activation quantile that keeps about k latents per token."""
    torch.manual_seed(seed)
    normalization_factor = float(x.pow(2).sum(-1).mean().sqrt())
    config = DMSAEConfig(
        d_in=D, num_latents=K, core_size=CORE, k=TOPK, variant=variant, normalization_factor=normalization_factor,
        base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", hook_module="model.layers.12",
        core_lineage=[[t % 3, 7 * t] for t in range(CORE)], cycle=3,
    )
    model = DMSAEModel(config)
    normalized = x / normalization_factor
    with torch.no_grad():
        model.core_encoder.add_(0.3 * torch.randn_like(model.core_encoder))
        model.encoder.add_(0.3 * torch.randn_like(model.encoder))
        model.b_dec.copy_(normalized.median(0).values)
        model.b_enc.copy_(-0.02 * torch.rand(K))
        pre = (normalized - model.b_dec) @ model.W_enc + model.b_enc
        masked = pre[:, CORE:] if variant == "dense_core" else pre
        model.config.threshold = float(masked.flatten().quantile(1 - TOPK / masked.shape[1]).clamp_min(0))
    return model.eval()


def eval_mode(model: DMSAEModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        latents = model.encode(x)
        return latents, model.decode(latents)


def threshold_flips(model: DMSAEModel, x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Entries active in one encoding only; each must sit at its latent's threshold (fp32 rounding)."""
    flips = (ours != 0) != (theirs != 0)
    if flips.any():
        with torch.no_grad():
            pre = (x / model.config.normalization_factor - model.b_dec) @ model.W_enc + model.b_enc
        rows, cols = flips.nonzero(as_tuple=True)
        bound = torch.where(cols < CORE, 0.0, model.config.threshold) if model.config.variant == "dense_core" else model.config.threshold
        assert torch.allclose(pre[rows, cols], torch.as_tensor(bound).expand(rows.shape), atol=1e-5), "a flip away from the threshold"
    return flips


@pytest.mark.parametrize("variant", ["dense_core", "sparse_core"])
def test_saelens_loads_the_export_as_the_same_sae(tmp_path: Path, variant: str):
    x = realistic_activations()
    model = trained_like_dmsae(variant, x)
    folder = to_saelens(model, tmp_path / "saelens", context_size=128, prepend_bos=False)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    sae = SAE.load_from_disk(folder)
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.d_in == D and sae.cfg.d_sae == K
    metadata = sae.cfg.metadata
    assert (metadata.model_name, metadata.hook_name, metadata.context_size, metadata.prepend_bos) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "blocks.12.hook_resid_post", 128, False,
    )
    expected_thresholds = torch.full((K,), model.config.threshold)
    if variant == "dense_core":
        expected_thresholds[:CORE] = 0  # the dense core is plain ReLU
    assert torch.equal(sae.threshold.detach(), expected_thresholds)

    held_out = realistic_activations(seed=1)  # not the tokens the threshold was set on
    ours, our_reconstruction = eval_mode(model, held_out)
    with torch.no_grad():
        theirs = sae.encode(held_out)
        their_reconstruction = sae.decode(theirs)
        their_forward = sae(held_out)
    flips = threshold_flips(model, held_out, ours, theirs)
    assert flips.sum() <= 2, f"{int(flips.sum())} threshold flips"
    same = ~flips.any(-1)
    assert (ours != 0).sum(-1).float().mean() > 4  # the comparison has latents to compare
    torch.testing.assert_close(theirs[same], ours[same], rtol=1e-5, atol=1e-5)
    scale = held_out.abs().max()
    torch.testing.assert_close(their_reconstruction[same], our_reconstruction[same], rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(their_forward[same], our_reconstruction[same], rtol=1e-5, atol=1e-6 * scale)
    # The model's own forward (the spliced reconstruction) agrees as well.
    with torch.no_grad():
        torch.testing.assert_close(model(held_out).reconstruction[same], their_reconstruction[same], rtol=1e-5, atol=1e-6 * scale)


def test_importing_the_export_gives_the_same_model(tmp_path: Path):
    x = realistic_activations()
    model = trained_like_dmsae("dense_core", x)
    folder = to_saelens(model, tmp_path / "saelens", context_size=128, prepend_bos=False)
    back = from_checkpoint(folder)
    ours, theirs = model.config.to_dict(), back.config.to_dict()
    assert {**theirs, "_name_or_path": ""} == {**ours, "_name_or_path": ""}  # core, lineage, groups, k, threshold
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=2e-7, atol=0, msg=name)
    held_out = realistic_activations(seed=2)
    assert not threshold_flips(model, held_out, eval_mode(model, held_out)[0], eval_mode(back, held_out)[0]).any()
    # Overrides still apply, and an export whose thresholds were edited is refused.
    moved = from_saelens(folder, base_model_id="org/other", hook_module="model.layers.3")
    assert (moved.config.base_model_id, moved.config.hook_layer, moved.config.hook_name) == ("org/other", 3, "blocks.3.hook_resid_post")
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "sae_weights.safetensors")
    state["threshold"][0] = 1.0
    save_file(state, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="weights were edited after the export"):
        from_saelens(folder)


def test_untrained_model_cannot_be_exported(tmp_path: Path):
    model = DMSAEModel(DMSAEConfig(d_in=8, num_latents=64, k=4, hook_module="model.layers.1"))
    with pytest.raises(ValueError, match="no inference threshold yet"):
        to_saelens(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_saved_dmsae(tmp_path: Path):
    model = trained_like_dmsae("dense_core", realistic_activations())
    model.save_pretrained(tmp_path / "dmsae")
    destination = tmp_path / "export"
    command = [sys.executable, "-m", "modeling_dmsae.convert_checkpoints", "--to", "saelens", str(tmp_path / "dmsae"), str(destination),
               "--context_size", "256", "--prepend_bos", "true"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(saelens)" in result.stdout
    cfg = json.loads((destination / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["context_size"] == 256 and cfg["metadata"]["prepend_bos"] is True
    assert cfg["metadata"][DMSAE_METADATA_KEY]["core_size"] == CORE
    x = realistic_activations(seed=3)
    with torch.no_grad():
        assert torch.equal(SAE.load_from_disk(destination).encode(x) != 0, model.encode(x) != 0)
    repeat = subprocess.run(command, capture_output=True, text=True, check=False)
    assert repeat.returncode != 0 and "--overwrite" in repeat.stderr


def test_a_save_without_hook_metadata_imports_when_told_where_it_reads(tmp_path: Path):
    """What SAELens's save_model writes outside its training runner: no hook_name, model_name or k."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=K))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, K) / D**0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(K, D), dim=-1))
        sae.b_dec.copy_(torch.randn(D))
        sae.threshold.fill_(0.25)
    sae.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert "hook_name" not in cfg["metadata"] and "model_name" not in cfg["metadata"]
    with pytest.raises(ValueError, match=r"no hook_name / model_name .*hook_module=.*base_model_id="):
        from_saelens(tmp_path / "sae", k=TOPK)
    with pytest.raises(ValueError, match=r"no model_name .*base_model_id"):
        from_saelens(tmp_path / "sae", k=TOPK, hook_module="model.layers.7")
    model = from_saelens(tmp_path / "sae", k=TOPK, hook_module="model.layers.7", base_model_id="HuggingFaceTB/SmolLM2-135M")
    assert (model.config.base_model_id, model.config.hook_layer, model.config.hook_name) == (
        "HuggingFaceTB/SmolLM2-135M", 7, "blocks.7.hook_resid_post",
    )
    x = realistic_activations(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x, use_threshold=True), sae.encode(x), rtol=1e-5, atol=1e-5)
