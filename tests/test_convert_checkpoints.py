"""Cycle 0 from published checkpoints: fixtures written in dictionary_learning's / SAEBench's and
SAELens's exact on-disk formats, imported, and compared with reference forwards written from
the sources' code (dictionary_learning trainers/matryoshka_batch_top_k.py; SAELens
saes/jumprelu_sae.py, batchtopk_sae.py, matryoshka_batchtopk_sae.py, topk_sae.py)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel

from modeling_dmsae import DMSAEModel, matryoshka_group_sizes
from modeling_dmsae.convert_checkpoints import (
    from_checkpoint,
    from_dictionary_learning,
    from_saelens,
    main,
    save_pretrained_atomically,
)

D, K, TOPK, TOKENS = 16, 256, 8, 64
TOL = dict(rtol=1e-5, atol=1e-5)


def activations(seed: int = 1, tokens: int = TOKENS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, D, generator=generator) * 2 + 0.5


def assert_same_latents(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(ours != 0, reference != 0), "the imported model keeps other latents than the source"
    torch.testing.assert_close(ours, reference, **TOL)


# ---- dictionary_learning / SAEBench -------------------------------------------------------


class DictionaryLearningMatryoshkaSAE(nn.Module):
    """dictionary_learning's MatryoshkaBatchTopKSAE, as far as its checkpoint and inference go:
    the same buffers and parameters, registered in the same order with the same dtypes."""

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int]):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("group_sizes", torch.tensor(group_sizes))
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(F.normalize(torch.randn(dict_size, activation_dim), dim=-1))  # unit rows
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.W_enc.data = self.W_dec.data.clone().T

    def encode(self, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        post_relu = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        if use_threshold:
            return post_relu * (post_relu > self.threshold)
        flat = post_relu.flatten()
        top = flat.topk(int(self.k) * x.size(0), sorted=False, dim=-1)
        return torch.zeros_like(flat).scatter_(-1, top.indices, top.values).reshape(post_relu.shape)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def decode_prefix(self, f: torch.Tensor, num_groups: int) -> torch.Tensor:
        """The trainer's cumulative reconstruction after ``num_groups`` groups."""
        sizes = self.group_sizes.tolist()
        x_hat = self.b_dec
        for W_dec_chunk, f_chunk in list(zip(self.W_dec.split(sizes), f.split(sizes, dim=1)))[:num_groups]:
            x_hat = x_hat + f_chunk @ W_dec_chunk
        return x_hat


def trained_dictionary_learning_sae(seed: int = 0, decoder_norms: torch.Tensor | None = None) -> DictionaryLearningMatryoshkaSAE:
    """A source SAE with non-trivial biases and a threshold that keeps about k latents per token."""
    torch.manual_seed(seed)
    sae = DictionaryLearningMatryoshkaSAE(D, K, TOPK, matryoshka_group_sizes(K))
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(D, K))
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        if decoder_norms is not None:
            sae.W_dec.mul_(decoder_norms[:, None])
        calibration = sae.encode(activations(seed=99), use_threshold=False)
        sae.threshold.fill_(calibration[calibration > 0].min())
    return sae


def saebench_trainer_config(layer: int = 3) -> dict:
    """config.json as dictionary_learning's trainSAE writes it for a SAEBench Matryoshka run."""
    return {
        "trainer": {
            "trainer_class": "MatryoshkaBatchTopKTrainer", "dict_class": "MatryoshkaBatchTopKSAE",
            "lr": 3e-4, "steps": 244140, "auxk_alpha": 0.03125, "warmup_steps": 1000, "decay_start": 195312,
            "threshold_beta": 0.999, "threshold_start_step": 1000, "top_k_aux": D // 2, "seed": 0,
            "activation_dim": D, "dict_size": K, "group_fractions": [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32],
            "group_weights": [0.2] * 5, "group_sizes": matryoshka_group_sizes(K), "k": TOPK, "device": "cuda:0",
            "layer": layer, "lm_name": "google/gemma-2-2b", "wandb_name": "MatryoshkaBatchTopKTrainer-google/gemma-2-2b",
            "submodule_name": f"resid_post_layer_{layer}",
        },
        "buffer": {"d_submodule": D, "io": "out", "n_ctxs": 244, "ctx_len": 1024, "refresh_batch_size": 4,
                   "out_batch_size": 2048, "device": "cpu"},
    }


def write_saebench_release(root: Path, saes: list[DictionaryLearningMatryoshkaSAE], layer: int = 3) -> Path:
    """SAEBench's layout: <release>/resid_post_layer_L/trainer_N/{ae.pt, config.json}; returns the layer folder."""
    layer_folder = root / "gemma-2-2b_matryoshka_batch_top_k_width-2pow8_date-0107" / f"resid_post_layer_{layer}"
    for index, sae in enumerate(saes):
        trainer = layer_folder / f"trainer_{index}"
        trainer.mkdir(parents=True)
        torch.save(sae.state_dict(), trainer / "ae.pt")
        (trainer / "config.json").write_text(json.dumps(saebench_trainer_config(layer), indent=4))
    return layer_folder


@pytest.fixture
def saebench(tmp_path) -> tuple[Path, DictionaryLearningMatryoshkaSAE]:
    source = trained_dictionary_learning_sae()
    layer_folder = write_saebench_release(tmp_path, [trained_dictionary_learning_sae(seed=5), source])
    return layer_folder / "trainer_1", source


def assert_matches_dictionary_learning(model: DMSAEModel, source: DictionaryLearningMatryoshkaSAE) -> None:
    x = activations()
    with torch.no_grad():
        for use_threshold in (True, False):
            reference = source.encode(x, use_threshold=use_threshold)
            latents = model.encode(x, use_threshold=use_threshold)
            assert_same_latents(latents, reference)
            for num_groups in range(1, len(model.config.group_sizes) + 1):
                torch.testing.assert_close(model.decode(reference, num_groups=num_groups), source.decode_prefix(reference, num_groups), **TOL)
            torch.testing.assert_close(model.decode(latents), source.decode(reference), **TOL)
        torch.testing.assert_close(model(x).reconstruction, source.decode(source.encode(x)), **TOL)


def test_saebench_trainer_folder_imports_as_cycle0(saebench):
    trainer_folder, source = saebench
    model = from_dictionary_learning(trainer_folder)
    config = model.config
    assert (config.d_in, config.num_latents, config.core_size, config.cycle) == (D, K, 0, 0)
    assert config.group_sizes == [8, 16, 32, 64, 136] and config.k == TOPK and config.k_noncore == TOPK
    assert config.threshold == source.threshold.item() > 0
    assert (config.base_model_id, config.hook_module, config.hook_layer, config.hook_name) == (
        "google/gemma-2-2b", "model.layers.3", 3, "blocks.3.hook_resid_post",
    )
    assert config.aux_alpha == 1 / 32 and config.normalization_factor == 1.0
    assert model.core_encoder.shape == (0, D) and not model.training
    torch.testing.assert_close(model.W_enc, source.W_enc, rtol=0, atol=0)
    assert_matches_dictionary_learning(model, source)


def test_ae_pt_file_and_checkpoint_subfolder_read_their_trainer_config(saebench):
    trainer_folder, source = saebench
    checkpoints = trainer_folder / "checkpoints"
    checkpoints.mkdir()
    torch.save(source.state_dict(), checkpoints / "ae_1000.pt")
    for path in (trainer_folder / "ae.pt", checkpoints / "ae_1000.pt"):
        model = from_dictionary_learning(path)
        assert model.config.hook_module == "model.layers.3"
        assert_matches_dictionary_learning(model, source)


def test_bare_ae_pt_takes_overrides(tmp_path):
    source = trained_dictionary_learning_sae()
    torch.save(source.state_dict(), tmp_path / "ae.pt")
    model = from_dictionary_learning(tmp_path / "ae.pt", base_model_id="HuggingFaceTB/SmolLM2-135M", hook_module="model.layers.7")
    assert (model.config.base_model_id, model.config.hook_layer, model.config.hook_name) == (
        "HuggingFaceTB/SmolLM2-135M", 7, "blocks.7.hook_resid_post",
    )
    assert_matches_dictionary_learning(model, source)


def test_plain_batchtopk_without_group_sizes(saebench, tmp_path):
    """dictionary_learning's BatchTopKSAE has no group_sizes buffer: config.json's, else one group."""
    trainer_folder, source = saebench
    state = source.state_dict()
    del state["group_sizes"]
    torch.save(state, trainer_folder / "ae.pt")
    assert from_dictionary_learning(trainer_folder).config.group_sizes == matryoshka_group_sizes(K)
    torch.save(state, tmp_path / "ae.pt")
    model = from_dictionary_learning(tmp_path / "ae.pt")
    assert model.config.group_sizes == [K]
    x = activations()
    with torch.no_grad():
        for use_threshold in (True, False):
            reference = source.encode(x, use_threshold=use_threshold)
            assert_same_latents(model.encode(x, use_threshold=use_threshold), reference)
            torch.testing.assert_close(model.decode(reference, num_groups=1), source.decode(reference), **TOL)


@pytest.fixture
def real_dictionary_learning():
    """dictionary_learning's own Matryoshka module when installed (``pip install --no-deps
    dictionary-learning einops``). The package's __init__ imports its nnsight activation buffer, so
    the package is registered without running it; sys.modules is restored afterwards."""
    before = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "dictionary_learning"}
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None:
            pytest.skip("dictionary_learning is not installed")
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = package
    try:
        yield importlib.import_module("dictionary_learning.trainers.matryoshka_batch_top_k")
    except ImportError as error:
        pytest.skip(f"dictionary_learning's trainers do not import: {error}")
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "dictionary_learning"]:
            del sys.modules[name]
        sys.modules.update(before)


def test_matches_the_real_dictionary_learning_module(saebench, real_dictionary_learning):
    """The same checks with dictionary_learning's own class as the reference."""
    trainer_folder, _ = saebench
    real = real_dictionary_learning.MatryoshkaBatchTopKSAE.from_pretrained(trainer_folder / "ae.pt")
    model = from_dictionary_learning(trainer_folder)
    x = activations()
    with torch.no_grad():
        for use_threshold in (True, False):
            assert_same_latents(model.encode(x, use_threshold=use_threshold), real.encode(x, use_threshold=use_threshold))
        torch.testing.assert_close(model(x).reconstruction, real(x), **TOL)


def test_release_folder_asks_for_a_trainer(saebench):
    trainer_folder, _ = saebench
    with pytest.raises(ValueError, match=r"name the trainer folder(.|\n)*trainer_0(.|\n)*trainer_1"):
        from_dictionary_learning(trainer_folder.parent.parent.parent)


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (lambda state: state.update(W_dec=state["W_dec"].T.contiguous()), ValueError, r"W_dec has shape \[16, 256\].*needs \[256, 16\]"),
        (lambda state: state.update(b_enc=state["b_enc"][:-1]), ValueError, r"b_enc has shape \[255\]"),
        (lambda state: state.pop("b_dec"), KeyError, r"lacks \['b_dec'\]"),
        (lambda state: state.pop("k"), KeyError, r"lacks \['k'\]"),
        (lambda state: state.update(threshold=torch.zeros(3)), ValueError, "threshold must be a scalar"),
    ],
    ids=["transposed-decoder", "short-bias", "missing-b_dec", "missing-k", "vector-threshold"],
)
def test_dictionary_learning_bad_weights_are_named(saebench, corrupt, error, message):
    trainer_folder, source = saebench
    state = source.state_dict()
    corrupt(state)
    torch.save(state, trainer_folder / "ae.pt")
    with pytest.raises(error, match=message):
        from_dictionary_learning(trainer_folder)


def test_dictionary_learning_bad_files_are_named(saebench, tmp_path):
    trainer_folder, _ = saebench
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_dictionary_learning(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no ae.pt"):
        from_dictionary_learning(tmp_path / "empty")
    config = saebench_trainer_config()
    config["trainer"]["dict_size"] = 2 * K
    (trainer_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trainer.dict_size = 512 but ae.pt has 256"):
        from_dictionary_learning(trainer_folder)
    config["trainer"].update(dict_size=K, dict_class="AutoEncoder")
    (trainer_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'AutoEncoder' is not a BatchTopK SAE"):
        from_dictionary_learning(trainer_folder)
    (trainer_folder / "ae.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        from_dictionary_learning(trainer_folder)


def test_decoder_norms_one_common_norm_is_folded_exactly(tmp_path):
    source = trained_dictionary_learning_sae(decoder_norms=torch.full((K,), 2.5))
    torch.save(source.state_dict(), tmp_path / "ae.pt")
    model = from_dictionary_learning(tmp_path / "ae.pt")
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(K))
    assert model.config.threshold == pytest.approx(2.5 * source.threshold.item())
    x = activations()
    with torch.no_grad():
        for use_threshold in (True, False):
            # Every latent scaled by the same 2.5: the same latents survive and x^ is unchanged.
            reference = source.encode(x, use_threshold=use_threshold)
            latents = model.encode(x, use_threshold=use_threshold)
            assert_same_latents(latents, 2.5 * reference)
            torch.testing.assert_close(model.decode(latents), source.decode(reference), **TOL)


def test_decoder_norms_that_differ_are_refused_or_kept_on_request(tmp_path):
    norms = torch.linspace(0.5, 1.5, K)
    source = trained_dictionary_learning_sae(decoder_norms=norms)
    torch.save(source.state_dict(), tmp_path / "ae.pt")
    with pytest.raises(ValueError, match=r"norms in \[0.5, 1.5\].*allow_non_unit_decoder=True"):
        from_dictionary_learning(tmp_path / "ae.pt")
    model = from_dictionary_learning(tmp_path / "ae.pt", allow_non_unit_decoder=True)
    torch.testing.assert_close(model.W_dec, source.W_dec, rtol=0, atol=0)
    assert_matches_dictionary_learning(model, source)


# ---- SAELens ------------------------------------------------------------------------------


class SAELensMatryoshkaTraining:
    """SAELens's MatryoshkaBatchTopKTrainingSAE with rescale_acts_by_decoder_norm=True: decoder rows
    of any norm, pre-activations scaled by them, BatchTopK over relu, a topk_threshold EMA."""

    def __init__(self, seed: int, widths: list[int], apply_b_dec_to_input: bool = True):
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(K, D, generator=generator)
        self.W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * (0.1 + 0.2 * torch.rand(K, 1, generator=generator))
        self.W_enc = self.W_dec.T.clone() * 10 + 0.5 * torch.randn(D, K, generator=generator)
        self.b_enc = 0.1 * torch.randn(K, generator=generator)
        self.b_dec = 0.3 * torch.randn(D, generator=generator)
        self.widths, self.apply_b_dec_to_input, self.k = widths, apply_b_dec_to_input, float(TOPK)
        acts = self.encode(activations(seed=99))
        self.topk_threshold = torch.tensor(acts[acts > 0].min().item(), dtype=torch.double)

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = x - self.b_dec * self.apply_b_dec_to_input
        return (sae_in @ self.W_enc + self.b_enc) * self.W_dec.norm(dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.hidden_pre(x).relu()
        flat = acts.flatten()
        top = torch.topk(flat, int(self.k * acts.shape[:-1].numel()), dim=-1)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)

    def decode(self, acts: torch.Tensor, width: int = K) -> torch.Tensor:
        acts = acts * (1 / self.W_dec.norm(dim=-1))
        return acts[:, :width] @ self.W_dec[:width] + self.b_dec

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """What save_inference_model writes: decoder norms folded, topk_threshold -> JumpReLU threshold."""
        norms = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        return {
            "W_enc": (self.W_enc * norms[None]).contiguous(),
            "b_enc": self.b_enc * norms,
            "W_dec": (self.W_dec / norms[:, None]).contiguous(),
            "b_dec": self.b_dec.clone(),
            "threshold": torch.ones(K) * self.topk_threshold.item(),
        }

    def inference_cfg(self, normalize_activations: str = "none") -> dict:
        """SAELens 6's inference cfg.json (JumpReLUSAEConfig fields + training details in metadata)."""
        return {
            "d_in": D, "d_sae": K, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": normalize_activations, "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": "6.5.0", "sae_lens_training_version": "6.5.0", "model_name": "gemma-2-2b",
                "hook_name": "blocks.5.hook_resid_post", "hook_head_index": None, "context_size": 1024,
                "prepend_bos": True, "seqpos_slice": [None], "model_from_pretrained_kwargs": {},
                "training_architecture": "matryoshka_batchtopk",
                "training_architecture_details": {
                    "k": self.k, "topk_threshold_lr": 0.01, "matryoshka_widths": self.widths,
                    "use_matryoshka_aux_loss": False, "aux_loss_coefficient": 1.0,
                    "rescale_acts_by_decoder_norm": True, "decoder_init_norm": 0.1, "use_sparse_activations": False,
                },
            },
            "architecture": "jumprelu",
        }

    def save_inference_model(self, folder: Path, **cfg_options) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.inference_state_dict(), folder / "sae_weights.safetensors")
        (folder / "cfg.json").write_text(json.dumps(self.inference_cfg(**cfg_options)))
        return folder


def jumprelu_encode(state: dict[str, torch.Tensor], x: torch.Tensor, apply_b_dec_to_input: bool) -> torch.Tensor:
    """SAELens JumpReLUSAE.encode on the saved weights."""
    hidden_pre = (x - state["b_dec"] * apply_b_dec_to_input) @ state["W_enc"] + state["b_enc"]
    return hidden_pre.relu() * (hidden_pre > state["threshold"]).to(hidden_pre.dtype)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_imports_as_cycle0(tmp_path, apply_b_dec_to_input):
    source = SAELensMatryoshkaTraining(seed=0, widths=[32, 96], apply_b_dec_to_input=apply_b_dec_to_input)
    model = from_saelens(source.save_inference_model(tmp_path / "sae"))
    config = model.config
    assert config.group_sizes == [32, 64, 160] and config.k == TOPK and config.core_size == 0
    assert config.threshold == source.topk_threshold.item()
    assert (config.base_model_id, config.hook_module, config.hook_layer, config.hook_name) == (
        "gemma-2-2b", "model.layers.5", 5, "blocks.5.hook_resid_post",
    )
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(K))
    x = activations()
    state = source.inference_state_dict()
    with torch.no_grad():
        inference = jumprelu_encode(state, x, apply_b_dec_to_input)
        assert_same_latents(model.encode(x, use_threshold=True), inference)
        training = source.encode(x)
        assert_same_latents(model.encode(x, use_threshold=False), training)
        for num_groups, width in enumerate([32, 96, K], start=1):
            torch.testing.assert_close(model.decode(training, num_groups=num_groups), source.decode(training, width), **TOL)
        torch.testing.assert_close(model(x).reconstruction, inference @ state["W_dec"] + state["b_dec"], **TOL)


def test_saelens_expected_average_norm_reads_the_activation_scaler(tmp_path):
    source = SAELensMatryoshkaTraining(seed=1, widths=[64])
    folder = source.save_inference_model(tmp_path / "sae", normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="no scaling factor is known; pass norm_scaling_factor"):
        from_saelens(folder)
    scale = 0.25
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": scale, "has_whitening": False}))
    model = from_saelens(folder)
    assert model.config.normalization_factor == 1 / scale
    x = activations() / scale  # raw activations; SAELens feeds the SAE x * scale and unscales its output
    state = source.inference_state_dict()
    with torch.no_grad():
        inference = jumprelu_encode(state, x * scale, True)
        assert_same_latents(model.encode(x, use_threshold=True), inference)
        torch.testing.assert_close(model(x).reconstruction, (inference @ state["W_dec"] + state["b_dec"]) / scale, **TOL)
    assert from_saelens(folder, norm_scaling_factor=0.5).config.normalization_factor == 2.0


def test_saelens_without_widths_or_k(tmp_path):
    source = SAELensMatryoshkaTraining(seed=2, widths=[])
    cfg = source.inference_cfg()
    del cfg["metadata"]["training_architecture_details"]
    folder = source.save_inference_model(tmp_path / "sae")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"records no BatchTopK k; pass k"):
        from_saelens(folder)
    model = from_saelens(folder, k=TOPK)
    assert model.config.group_sizes == [K] and model.config.k == TOPK


def edit_saelens(folder: Path, cfg_edit=None, state_edit=None) -> None:
    if cfg_edit is not None:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg_edit(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    if state_edit is not None:
        from safetensors.torch import load_file

        state = load_file(folder / "sae_weights.safetensors")
        state_edit(state)
        save_file(state, folder / "sae_weights.safetensors")


@pytest.mark.parametrize(
    "cfg_edit, state_edit, error, message",
    [
        (None, lambda s: s["threshold"].__setitem__(3, 0.5), ValueError, "thresholds differ across latents"),
        (None, lambda s: s.update(W_enc=s["W_enc"][:, :-8].contiguous()), ValueError, r"b_enc has shape \[256\].*needs \[248\]"),
        (None, lambda s: s.pop("threshold"), KeyError, r"lacks \['threshold'\]"),
        (lambda c: c.update(architecture="matryoshka_batchtopk"), None, ValueError, "save_inference_model"),
        (lambda c: c.update(architecture="topk"), None, ValueError, "architecture 'topk'"),
        (lambda c: c.update(normalize_activations="layer_norm"), None, ValueError, "cannot reproduce"),
        (lambda c: c.update(d_sae=512), None, ValueError, "d_sae = 512 but the weights have 16, 256"),
        (lambda c: c["metadata"].update(hook_name="blocks.5.hook_resid_pre"), None, ValueError, "pass hook_module"),
        (lambda c: c["metadata"]["training_architecture_details"].update(k=7.5), None, ValueError, "k = 7.5 is not a positive integer"),
        (lambda c: c["metadata"]["training_architecture_details"].update(matryoshka_widths=[96, 32]), None, ValueError, "increase strictly"),
    ],
    ids=["per-latent-threshold", "short-encoder", "missing-threshold", "training-checkpoint", "topk-architecture",
         "layer-norm", "d_sae-mismatch", "unknown-hook", "fractional-k", "decreasing-widths"],
)
def test_saelens_bad_checkpoints_are_named(tmp_path, cfg_edit, state_edit, error, message):
    folder = SAELensMatryoshkaTraining(seed=3, widths=[32, 96]).save_inference_model(tmp_path / "sae")
    edit_saelens(folder, cfg_edit, state_edit)
    with pytest.raises(error, match=message):
        from_saelens(folder)


def test_saelens_missing_files_are_named(tmp_path):
    folder = SAELensMatryoshkaTraining(seed=3, widths=[32]).save_inference_model(tmp_path / "sae")
    os.remove(folder / "cfg.json")
    with pytest.raises(FileNotFoundError, match="cfg.json not found: from_saelens needs"):
        from_saelens(folder)


# ---- Round trips --------------------------------------------------------------------------


def test_imported_model_round_trips_through_auto_model(saebench, tmp_path):
    trainer_folder, _ = saebench
    model = from_dictionary_learning(trainer_folder)
    model.save_pretrained(tmp_path / "dmsae")
    loaded = AutoModel.from_pretrained(tmp_path / "dmsae")
    assert isinstance(loaded, DMSAEModel)
    saved, original = loaded.config.to_dict(), model.config.to_dict()
    assert {**saved, "_name_or_path": ""} == {**original, "_name_or_path": ""}
    x = activations(seed=7)
    with torch.no_grad():
        for use_threshold in (True, False):
            assert torch.equal(loaded.encode(x, use_threshold=use_threshold), model.encode(x, use_threshold=use_threshold))


def test_cli_writes_a_loadable_folder_and_keeps_existing_ones(tmp_path):
    source = SAELensMatryoshkaTraining(seed=4, widths=[32, 96])
    folder = source.save_inference_model(tmp_path / "sae")
    destination = tmp_path / "out" / "cycle0"
    result = subprocess.run(
        [sys.executable, "-m", "modeling_dmsae.convert_checkpoints", str(folder), str(destination)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "groups=[32, 64, 160]" in result.stdout
    loaded = AutoModel.from_pretrained(destination)
    x = activations(seed=8)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x, use_threshold=True), from_checkpoint(folder).encode(x, use_threshold=True))
    with pytest.raises(FileExistsError, match="--overwrite"):
        main([str(folder), str(destination)])
    main([str(folder), str(destination), "--overwrite", "--k", "4"])
    assert AutoModel.from_pretrained(destination).config.k == 4
    assert sorted(p.name for p in destination.parent.iterdir()) == ["cycle0"]  # no staging folders left


def test_cli_reads_a_hub_folder_and_says_in_one_line_what_it_cannot_fetch(saebench, tmp_path, hub):
    """SRC as ORG/NAME[@REVISION][:SUBFOLDER]: a SAEBench trainer folder inside a release repo."""
    trainer_folder, source = saebench
    repo = f"{hub.org}/saebench-release"
    HfApi().create_repo(repo)
    HfApi().upload_folder(repo_id=repo, folder_path=trainer_folder.parent, path_in_repo="resid_post_layer_3")
    main([f"{repo}:resid_post_layer_3/trainer_1", str(tmp_path / "cycle0")])
    assert_matches_dictionary_learning(AutoModel.from_pretrained(tmp_path / "cycle0"), source)
    with pytest.raises(SystemExit, match=f"no repo {hub.org}/no-such-release on the Hub"):
        main([f"{hub.org}/no-such-release:trainer_1", str(tmp_path / "missing")])
    never_fetched = f"{hub.org}/other-release@v2:trainer_0"
    result = subprocess.run(
        [sys.executable, "-m", "modeling_dmsae.convert_checkpoints", never_fetched, str(tmp_path / "offline")],
        capture_output=True, text=True, check=False, env=hub.subprocess_env(HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{never_fetched}: {never_fetched} is not in the Hugging Face cache" in result.stderr and "unset HF_HUB_OFFLINE" in result.stderr


def test_failed_overwrite_keeps_the_previous_folder(saebench, tmp_path, monkeypatch):
    trainer_folder, _ = saebench
    model = from_dictionary_learning(trainer_folder)
    destination = tmp_path / "cycle0"
    save_pretrained_atomically(model, destination, overwrite=False)
    before = sorted(p.name for p in destination.iterdir())

    def crash(folder, **kwargs):
        Path(folder).mkdir()
        (Path(folder) / "config.json").write_text("{")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomically(model, destination, overwrite=True)
    assert sorted(p.name for p in destination.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert isinstance(AutoModel.from_pretrained(destination), DMSAEModel)
