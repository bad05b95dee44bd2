"""Cycle 0 from published checkpoints: import a Matryoshka BatchTopK SAE as a DMSAE with c = 0.

Two on-disk formats are read:

* dictionary_learning / SAEBench: ``ae.pt`` (a torch state dict with ``W_enc`` [d, K], ``b_enc``,
  ``W_dec`` [K, d], ``b_dec``, the scalar inference ``threshold`` buffer (-1 = not estimated), ``k``
  and ``group_sizes``) beside a ``config.json`` of the form ``{"trainer": {...}, "buffer": {...}}``.
  SAEBench releases nest these as ``<release>/resid_post_layer_12/trainer_N/``.
* SAELens: ``sae_weights.safetensors`` + ``cfg.json``. SAELens saves a trained (Matryoshka)
  BatchTopK SAE as a JumpReLU SAE whose per-latent threshold vector repeats the BatchTopK
  threshold, with the decoder norms already folded into the encoder.

Both sources compute f = relu((x - b_dec) W_enc + b_enc) and x^ = f W_dec + b_dec on raw
activations, keep latents with f > threshold at inference and the top k * N of the batch in
training, which is what :class:`DMSAEModel` does with ``core_size = 0``; so the import only moves
tensors, plus two exact rewrites where a source differs (documented at each).

Decoder norms: DMSAE assumes unit-norm decoder rows. Folding a row norm n_j into the encoder
(W_enc[:, j] n_j, b_enc[j] n_j, W_dec[j] / n_j) keeps every reconstruction but scales latent j's
activation by n_j, which changes both BatchTopK's ranking across latents and which latents pass a
single scalar threshold, unless all n_j are equal. So: unit rows are kept, one common norm is
folded (exact: BatchTopK ranks are unchanged and the threshold scales by it), and differing norms
are refused unless ``allow_non_unit_decoder=True`` keeps the weights unchanged (encode and decode
then still match the source exactly, but attribution's s_uj = g . W_dec[j] / ||W_dec[j]|| and any
further training, which renormalises rows, assume unit rows).

Export: :func:`to_saelens` writes a DMSAE in SAELens's on-disk format (``cfg.json`` +
``sae_weights.safetensors``, architecture ``jumprelu``), which ``sae_lens.SAE.load_from_disk``,
SAEBench, Neuronpedia and sae-dashboard read. At inference a DMSAE *is* a JumpReLU SAE: eval-mode
``encode`` keeps the dense-core latents where their pre-activation is > 0 (ReLU) and every other
latent where it exceeds the inference threshold, so the per-latent JumpReLU threshold is 0 for the
core and ``config.threshold`` for the rest; the normalisation factor is folded into the weights
(see :func:`saelens_state_dict`). The DMSAE configuration rides along in ``metadata.dmsae_config``,
so importing the export back rebuilds the same model, core and lineage included.

CLI::

    python -m modeling_dmsae.convert_checkpoints SRC DST [--k K] [--overwrite]           # import as DMSAE
    python -m modeling_dmsae.convert_checkpoints --to saelens SRC DST \
        [--context_size 1024] [--prepend_bos true]                                      # export to SAELens

SRC is a local path or a folder of a Hub repo, ``ORG/NAME[@REVISION][:SUBFOLDER]`` (e.g. a SAEBench
release's ``ORG/NAME:<sae>/resid_post_layer_12/trainer_2``), fetched into the Hugging Face cache
(read from it offline, with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import simple_parsing
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .configuration_dmsae import DMSAEConfig
from .modeling_dmsae import DMSAEModel

logger = logging.getLogger(__name__)

DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
DICTIONARY_LEARNING_CONFIG = "config.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
SAELENS_ACTIVATION_SCALER = "activation_scaler.json"
# Key of the exported DMSAE configuration in a SAELens cfg.json's metadata.
DMSAE_METADATA_KEY = "dmsae_config"
# SAELens version whose format the export writes (and the tests load it with). SAELens reads a cfg.json
# without a version >= 6 in metadata as a pre-6 config, with the metadata at the top level.
SAELENS_FORMAT_VERSION = "6.54.12"

# dictionary_learning autoencoder classes whose encode/decode are the BatchTopK ones above.
DICTIONARY_LEARNING_CLASSES = ("MatryoshkaBatchTopKSAE", "BatchTopKSAE")
# TransformerLens hook point -> the transformers module whose output it is.
HOOK_MODULES = {
    "hook_resid_post": "model.layers.{layer}",
    "hook_mlp_out": "model.layers.{layer}.mlp",
    "hook_attn_out": "model.layers.{layer}.self_attn",
}
# Relative deviation of decoder row norms tolerated as "equal" (float32 renormalisation noise).
DECODER_NORM_RTOL = 1e-3


class SourceWeights(NamedTuple):
    """An SAE in SAEBench layout acting on raw activations:
    f = relu((x - b_dec) W_enc + b_enc), kept where f > threshold; x^ = f W_dec + b_dec."""

    W_enc: torch.Tensor  # [d, K]
    b_enc: torch.Tensor  # [K]
    W_dec: torch.Tensor  # [K, d]
    b_dec: torch.Tensor  # [d]
    threshold: float  # -1: not estimated


class HookSite(NamedTuple):
    """Where the SAE reads its activations; None fields take DMSAEConfig's defaults."""

    base_model_id: str | None
    hook_module: str | None
    hook_layer: int | None = None
    hook_name: str | None = None


# ----------------------------------------------------------------------------------------
# Shared: weights -> DMSAEModel
# ----------------------------------------------------------------------------------------


def check_shapes(weights: SourceWeights, source: str) -> tuple[int, int]:
    """(d, K) of a consistent set of weights; a ValueError naming the tensor otherwise."""
    if weights.W_enc.ndim != 2:
        raise ValueError(f"{source}: W_enc must be a [d_in, num_latents] matrix, got shape {list(weights.W_enc.shape)}")
    d, K = weights.W_enc.shape
    expected = {"b_enc": [K], "W_dec": [K, d], "b_dec": [d]}
    for name, shape in expected.items():
        actual = list(getattr(weights, name).shape)
        if actual != shape:
            raise ValueError(
                f"{source}: {name} has shape {actual}, but W_enc [d_in, num_latents] = [{d}, {K}] needs {shape}; "
                "the checkpoint is truncated or its tensors are transposed"
            )
    return d, K


def unit_decoder_rows(weights: SourceWeights, allow_non_unit_decoder: bool, source: str) -> SourceWeights:
    """Weights whose decoder rows have unit norm, when that can be reached exactly (module docstring)."""
    norms = torch.linalg.vector_norm(weights.W_dec.double(), dim=-1)
    if torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=DECODER_NORM_RTOL):
        return weights
    common = norms.mean()
    if torch.allclose(norms, common.expand_as(norms), rtol=DECODER_NORM_RTOL, atol=0):
        # f_j W_dec[j] = (s f_j)(W_dec[j] / s) with one s for all j: BatchTopK's order is unchanged
        # and f > t becomes s f > s t, so the rescaled model selects the same latents.
        scale = common.item()
        threshold = weights.threshold * scale if weights.threshold >= 0 else weights.threshold
        return SourceWeights(
            (weights.W_enc.double() * scale).to(weights.W_enc.dtype),
            (weights.b_enc.double() * scale).to(weights.b_enc.dtype),
            (weights.W_dec.double() / scale).to(weights.W_dec.dtype),
            weights.b_dec,
            threshold,
        )
    if allow_non_unit_decoder:
        logger.warning(
            "%s: decoder row norms range over [%.4g, %.4g]; kept as they are (allow_non_unit_decoder=True)",
            source, norms.min().item(), norms.max().item(),
        )
        return weights
    raise ValueError(
        f"{source}: decoder rows have norms in [{norms.min().item():.4g}, {norms.max().item():.4g}], but DMSAE "
        "assumes unit-norm rows. Folding different norms into the encoder would rescale each latent differently "
        "and so change which latents BatchTopK and the scalar threshold keep, so it cannot be exact. Pass "
        "allow_non_unit_decoder=True (CLI: --allow_non_unit_decoder) to keep the weights as they are: encode and "
        "decode stay exact, but attribution and further training assume unit rows"
    )


def build_cycle0_model(
    weights: SourceWeights,
    *,
    k: int,
    group_sizes: Sequence[int],
    site: HookSite,
    source: str,
    normalization_factor: float = 1.0,
    allow_non_unit_decoder: bool = False,
    **config_fields: Any,
) -> DMSAEModel:
    """A c = 0 DMSAEModel computing exactly what ``weights`` compute, in their dtype."""
    d, K = check_shapes(weights, source)
    if sum(group_sizes) != K:
        raise ValueError(f"{source}: group sizes {list(group_sizes)} sum to {sum(group_sizes)}, but the SAE has {K} latents")
    weights = unit_decoder_rows(weights, allow_non_unit_decoder, source)
    config = DMSAEConfig(
        d_in=d,
        num_latents=K,
        core_size=0,
        group_sizes=[int(size) for size in group_sizes],
        k=k,
        threshold=float(weights.threshold),
        normalization_factor=normalization_factor,
        cycle=0,
        **{name: value for name, value in site._asdict().items() if value is not None},
        **config_fields,
    )
    model = DMSAEModel(config).to(weights.W_enc.dtype)
    with torch.no_grad():
        # c = 0: every encoder row is a trainable non-core row.
        model.encoder.copy_(weights.W_enc.T)
        model.b_enc.copy_(weights.b_enc)
        model.W_dec.copy_(weights.W_dec)
        model.b_dec.copy_(weights.b_dec)
    return model.eval()


def hook_site(layer: int, hook_point: str, base_model_id: str, source: str, hook_module: str | None) -> HookSite:
    """HookSite of a TransformerLens hook point ``blocks.{layer}.{hook_point}``; ``hook_module``
    overrides the transformers module path (needed for hook points without a known module)."""
    if hook_module is None:
        if hook_point not in HOOK_MODULES:
            raise ValueError(
                f"{source}: hook point {hook_point!r} has no known transformers module (known: {sorted(HOOK_MODULES)}); "
                "pass hook_module='<module path whose output the SAE reads>' (CLI: --hook_module)"
            )
        hook_module = HOOK_MODULES[hook_point].format(layer=layer)
    return HookSite(base_model_id, hook_module, layer, f"blocks.{layer}.{hook_point}")


def integer_k(value: Any, source: str) -> int:
    """k as an int: SAELens stores BatchTopK's k as a float (k * batch may be fractional)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != int(value) or value <= 0:
        raise ValueError(f"{source}: k = {value!r} is not a positive integer; DMSAE's BatchTopK keeps an integer k per token")
    return int(value)


# ----------------------------------------------------------------------------------------
# dictionary_learning / SAEBench
# ----------------------------------------------------------------------------------------


def find_dictionary_learning_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(ae.pt, config.json or None) for an ``ae.pt`` file or a trainer folder.

    A checkpoint under ``trainer_N/checkpoints/`` takes its trainer's config.json."""
    path = Path(path)
    if path.is_file():
        candidates = [path.parent / DICTIONARY_LEARNING_CONFIG, path.parent.parent / DICTIONARY_LEARNING_CONFIG]
        return path, next((c for c in candidates if c.is_file()), None)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: pass an {DICTIONARY_LEARNING_WEIGHTS} file or the folder holding it")
    weights = path / DICTIONARY_LEARNING_WEIGHTS
    if weights.is_file():
        config = path / DICTIONARY_LEARNING_CONFIG
        return weights, config if config.is_file() else None
    trainers = sorted(str(p.parent) for p in path.rglob(DICTIONARY_LEARNING_WEIGHTS))
    if trainers:
        listing = "\n  ".join(trainers[:20]) + ("\n  ..." if len(trainers) > 20 else "")
        raise ValueError(
            f"{path} is a release folder holding {len(trainers)} SAEs; name the trainer folder to import, one of:\n  {listing}"
        )
    raise FileNotFoundError(f"{path} holds no {DICTIONARY_LEARNING_WEIGHTS}: pass a dictionary_learning trainer folder or ae.pt file")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-download it") from error


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"{path} is not a readable torch checkpoint ({error}); re-download it") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def require_keys(mapping: dict[str, Any], keys: Sequence[str], source: str, what: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise KeyError(f"{source}: {what} lacks {missing} (has {sorted(mapping)}); the file is not a complete {what}")


def dictionary_learning_site(
    trainer: dict[str, Any], buffer: dict[str, Any], source: str, base_model_id: str | None, hook_module: str | None
) -> HookSite:
    """HookSite from config.json: ``trainer.lm_name``, ``trainer.layer``, ``trainer.submodule_name``
    (e.g. ``resid_post_layer_12``) and ``buffer.io`` (the module's output or input)."""
    require_keys(trainer, ["lm_name", "layer"], source, "config.json 'trainer' section")
    layer = int(trainer["layer"])
    if buffer.get("io", "out") != "out":
        raise ValueError(
            f"{source}: the SAE was trained on the {buffer['io']!r} activations of its submodule; only module "
            "outputs (buffer.io = 'out') map onto DMSAE's hook"
        )
    submodule = trainer.get("submodule_name") or f"resid_post_layer_{layer}"
    match = re.fullmatch(r"(\w+?)_layer_(\d+)", submodule)
    if match is None or int(match.group(2)) != layer:
        raise ValueError(
            f"{source}: submodule_name {submodule!r} is not '<hook>_layer_{layer}' (e.g. resid_post_layer_{layer}); "
            "pass hook_module to say which module the SAE reads"
        )
    return hook_site(layer, f"hook_{match.group(1)}", base_model_id or trainer["lm_name"], source, hook_module)


def from_dictionary_learning(
    path: str | os.PathLike,
    *,
    allow_non_unit_decoder: bool = False,
    base_model_id: str | None = None,
    hook_module: str | None = None,
) -> DMSAEModel:
    """Import a dictionary_learning / SAEBench (Matryoshka) BatchTopK SAE as a cycle-0 DMSAE.

    Args:
        path: an ``ae.pt`` file, or a trainer folder holding ``ae.pt`` + ``config.json``
            (e.g. ``<release>/resid_post_layer_12/trainer_2``).
        allow_non_unit_decoder: keep decoder rows whose norms differ (see the module docstring).
        base_model_id, hook_module: override what config.json says (needed for a bare ``ae.pt``).
    """
    weights_path, config_path = find_dictionary_learning_files(path)
    source = str(weights_path)
    state = load_torch_state_dict(weights_path)
    require_keys(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k"], source, "dictionary_learning BatchTopK state dict")
    trainer, buffer = {}, {}
    if config_path is not None:
        config = read_json(config_path)
        require_keys(config, ["trainer"], str(config_path), "dictionary_learning config.json")
        trainer, buffer = config["trainer"], config.get("buffer", {})
        if trainer.get("dict_class", DICTIONARY_LEARNING_CLASSES[0]) not in DICTIONARY_LEARNING_CLASSES:
            raise ValueError(
                f"{config_path}: dict_class {trainer['dict_class']!r} is not a BatchTopK SAE "
                f"({' or '.join(DICTIONARY_LEARNING_CLASSES)}); DMSAE cannot reproduce its encoder"
            )
        site = dictionary_learning_site(trainer, buffer, str(config_path), base_model_id, hook_module)
    else:
        site = HookSite(base_model_id, hook_module)
        if None in site[:2]:
            logger.warning(
                "%s has no config.json beside it: DMSAEConfig's default base model / hook module fill what "
                "base_model_id=%r, hook_module=%r leave open", source, base_model_id, hook_module,
            )
    for key in ("threshold", "k"):
        if state[key].numel() != 1:
            raise ValueError(f"{source}: {key} must be a scalar, got shape {list(state[key].shape)}")
    weights = SourceWeights(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], state["threshold"].item())
    d, K = check_shapes(weights, source)
    for section_name, section, key, value in (
        ("trainer", trainer, "activation_dim", d), ("trainer", trainer, "dict_size", K), ("buffer", buffer, "d_submodule", d)
    ):
        if section.get(key) is not None and int(section[key]) != value:
            raise ValueError(
                f"{config_path}: {section_name}.{key} = {section[key]} but {weights_path.name} has {value}; "
                "the two files belong to different SAEs"
            )
    if "group_sizes" in state:
        group_sizes = state["group_sizes"].tolist()
    else:  # a plain BatchTopKSAE: one group
        group_sizes = trainer.get("group_sizes", [K])
    extra = {"aux_alpha": float(trainer["auxk_alpha"])} if "auxk_alpha" in trainer else {}
    return build_cycle0_model(
        weights,
        k=integer_k(state["k"], source),
        group_sizes=group_sizes,
        site=site,
        source=source,
        allow_non_unit_decoder=allow_non_unit_decoder,
        **extra,
    )


# ----------------------------------------------------------------------------------------
# SAELens
# ----------------------------------------------------------------------------------------


def saelens_field(cfg: dict[str, Any], name: str) -> Any:
    """A cfg.json field wherever the SAELens version put it: the top level (SAELens 5, training
    configs), ``metadata`` or ``metadata.training_architecture_details`` (SAELens 6 inference)."""
    metadata = cfg.get("metadata") or {}
    for section in (cfg, metadata, metadata.get("training_architecture_details") or {}, cfg.get("activation_fn_kwargs") or {}):
        if section.get(name) is not None:
            return section[name]
    return None


def shared_threshold(threshold: torch.Tensor, num_latents: int, source: str) -> float:
    """SAELens's per-latent JumpReLU threshold as DMSAE's scalar one.

    SAELens writes BatchTopK's threshold into every entry. JumpReLU keeps relu(h) where h > t, so a
    negative t keeps what ReLU keeps, which is DMSAE's threshold 0."""
    if list(threshold.shape) != [num_latents]:
        raise ValueError(f"{source}: threshold has shape {list(threshold.shape)}, expected one entry per latent [{num_latents}]")
    if not bool((threshold == threshold[0]).all()):
        raise ValueError(
            f"{source}: the JumpReLU thresholds differ across latents (from {threshold.min().item():.4g} to "
            f"{threshold.max().item():.4g}): this SAE was not trained as a BatchTopK SAE, whose threshold SAELens "
            "saves in every entry, and DMSAE has a single scalar threshold"
        )
    return max(threshold[0].item(), 0.0)


def fold_decoder_bias_into_encoder(weights: SourceWeights) -> SourceWeights:
    """SAELens with ``apply_b_dec_to_input=False`` encodes x W_enc + b_enc; DMSAE subtracts b_dec first.
    x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc), so move b_dec W_enc into b_enc."""
    b_enc = weights.b_enc.double() + weights.b_dec.double() @ weights.W_enc.double()
    return weights._replace(b_enc=b_enc.to(weights.b_enc.dtype))


def saelens_normalization_factor(cfg: dict[str, Any], folder: Path, norm_scaling_factor: float | None, source: str) -> float:
    """DMSAE's ``normalization_factor`` for SAELens's ``normalize_activations``.

    ``expected_average_only_in``: the SAE reads x * s (s = sqrt(d) / E||x||) and writes in those units;
    DMSAE divides by normalization_factor and multiplies back, so it is 1 / s. s comes from the
    argument, else from the activation_scaler.json SAELens checkpoints carry."""
    mode = cfg.get("normalize_activations") or "none"
    if mode == "none":
        return 1.0
    if mode != "expected_average_only_in":
        raise ValueError(
            f"{source}: normalize_activations = {mode!r} rescales every token by its own statistics, which DMSAE "
            "(one fixed normalization_factor) cannot reproduce"
        )
    scaler_path = folder / SAELENS_ACTIVATION_SCALER
    if norm_scaling_factor is None and scaler_path.is_file():
        scaler = read_json(scaler_path)
        if scaler.get("has_whitening"):
            raise ValueError(f"{scaler_path}: the SAE reads whitened activations, which DMSAE cannot reproduce")
        norm_scaling_factor = scaler.get("scaling_factor")
    if norm_scaling_factor is None:
        raise ValueError(
            f"{source}: normalize_activations = 'expected_average_only_in' but no scaling factor is known; pass "
            "norm_scaling_factor (CLI: --norm_scaling_factor), e.g. the value SAELens's pretrained_saes.yaml lists "
            f"for this SAE, or put SAELens's {SAELENS_ACTIVATION_SCALER} beside the weights"
        )
    if not norm_scaling_factor > 0 or not math.isfinite(norm_scaling_factor):
        raise ValueError(f"{source}: norm scaling factor must be a positive finite number, got {norm_scaling_factor!r}")
    return 1.0 / float(norm_scaling_factor)


def matryoshka_group_sizes_from_widths(widths: Sequence[int] | None, num_latents: int, source: str) -> list[int]:
    """Group sizes from SAELens's cumulative ``matryoshka_widths``; a final level of width d_sae
    is added when missing, as SAELens does; no widths: one group."""
    widths = [int(width) for width in widths or []]
    if not widths or widths[-1] < num_latents:
        widths.append(num_latents)
    if widths[0] <= 0 or widths[-1] != num_latents or any(a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(
            f"{source}: matryoshka_widths {widths} must increase strictly from a positive width to d_sae = {num_latents}"
        )
    return [b - a for a, b in zip([0, *widths], widths)]


def saelens_site(cfg: dict[str, Any], source: str, base_model_id: str | None, hook_module: str | None) -> HookSite:
    """HookSite from ``model_name`` and ``hook_name`` (``blocks.12.hook_resid_post``; the layer is
    parsed from it and checked against ``hook_layer`` where SAELens 5 stored one)."""
    hook_name, model_name = saelens_field(cfg, "hook_name"), saelens_field(cfg, "model_name")
    missing = [name for name, value, override in (("hook_name", hook_name, hook_module), ("model_name", model_name, base_model_id))
               if value is None and override is None]
    if missing:
        raise ValueError(
            f"{source}: cfg.json has no {' / '.join(missing)} (SAELens's save_model writes no hook metadata outside its "
            "training runner); say where the SAE reads with hook_module='model.layers.<layer>' and base_model_id='<Hub id>' "
            "(CLI: --hook_module, --base_model_id)"
        )
    if hook_name is None:  # hook_module given: DMSAEConfig derives the layer and the TransformerLens name from it
        return HookSite(base_model_id or model_name, hook_module)
    match = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", hook_name)
    if match is None:
        raise ValueError(f"{source}: hook_name {hook_name!r} is not a TransformerLens block hook 'blocks.<layer>.<hook>'")
    layer = int(match.group(1))
    if base_model_id is None and "/" not in model_name:
        logger.warning(
            "%s: model_name %r is a TransformerLens name, not a Hub id; pass base_model_id (e.g. google/%s) "
            "so the trainer loads the right model", source, model_name, model_name,
        )
    hook_layer = saelens_field(cfg, "hook_layer")
    if hook_layer is not None and int(hook_layer) != layer:
        raise ValueError(f"{source}: hook_layer = {hook_layer} contradicts hook_name {hook_name!r}")
    if saelens_field(cfg, "hook_head_index") is not None:
        raise ValueError(f"{source}: the SAE reads a single attention head (hook_head_index), which DMSAE's hook cannot select")
    return hook_site(layer, match.group(2), base_model_id or model_name, source, hook_module)


def from_saelens(
    path: str | os.PathLike,
    *,
    k: int | None = None,
    norm_scaling_factor: float | None = None,
    allow_non_unit_decoder: bool = False,
    base_model_id: str | None = None,
    hook_module: str | None = None,
) -> DMSAEModel:
    """Import a SAELens (Matryoshka) BatchTopK SAE, saved as JumpReLU, as a cycle-0 DMSAE.

    Args:
        path: folder holding ``sae_weights.safetensors`` + ``cfg.json``.
        k: BatchTopK's k; default: the k SAELens recorded in cfg.json.
        norm_scaling_factor: the s of ``normalize_activations = 'expected_average_only_in'``.
        allow_non_unit_decoder: keep decoder rows whose norms differ (see the module docstring).
        base_model_id, hook_module: override ``model_name`` (a TransformerLens name) and the
            transformers module derived from ``hook_name``.
    """
    folder = Path(path)
    weights_path, config_path = folder / SAELENS_WEIGHTS, folder / SAELENS_CONFIG
    for required in (weights_path, config_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} not found: from_saelens needs a folder holding {SAELENS_WEIGHTS} and {SAELENS_CONFIG}, "
                "as SAELens's save_inference_model writes them"
            )
    source, cfg = str(folder), read_json(config_path)
    require_keys(cfg, ["d_in", "d_sae", "architecture"], str(config_path), "SAELens cfg.json")
    if cfg["architecture"] in ("batchtopk", "matryoshka_batchtopk"):
        raise ValueError(
            f"{source} is a SAELens training checkpoint ({cfg['architecture']}); export it with "
            "sae.save_inference_model(path), which folds the decoder norms and writes the JumpReLU threshold, and import that"
        )
    if cfg["architecture"] != "jumprelu":
        raise ValueError(
            f"{source}: architecture {cfg['architecture']!r} is not how SAELens saves a (Matryoshka) BatchTopK SAE "
            "('jumprelu' with one shared threshold); DMSAE cannot reproduce its encoder"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ValueError(f"{source}: reshape_activations = {cfg['reshape_activations']!r} (per-head activations) is not supported")
    try:
        state = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({error}); re-download it") from error
    require_keys(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], str(weights_path), "SAELens JumpReLU state dict")
    weights = SourceWeights(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], -1.0)
    d, K = check_shapes(weights, str(weights_path))
    if (int(cfg["d_in"]), int(cfg["d_sae"])) != (d, K):
        raise ValueError(f"{source}: cfg.json says d_in = {cfg['d_in']}, d_sae = {cfg['d_sae']} but the weights have {d}, {K}")
    exported = saelens_field(cfg, DMSAE_METADATA_KEY)
    if exported is not None:
        return from_saelens_export(state, exported, str(weights_path), base_model_id=base_model_id, hook_module=hook_module)
    weights = weights._replace(threshold=shared_threshold(state["threshold"], K, str(weights_path)))
    if not cfg.get("apply_b_dec_to_input", True):
        weights = fold_decoder_bias_into_encoder(weights)
    k = k if k is not None else saelens_field(cfg, "k")
    if k is None:
        raise ValueError(f"{source}: cfg.json records no BatchTopK k; pass k (CLI: --k)")
    return build_cycle0_model(
        weights,
        k=integer_k(k, source),
        group_sizes=matryoshka_group_sizes_from_widths(saelens_field(cfg, "matryoshka_widths"), K, source),
        site=saelens_site(cfg, source, base_model_id, hook_module),
        source=source,
        normalization_factor=saelens_normalization_factor(cfg, folder, norm_scaling_factor, source),
        allow_non_unit_decoder=allow_non_unit_decoder,
    )


# ----------------------------------------------------------------------------------------
# Export to SAELens (and back)
# ----------------------------------------------------------------------------------------


def saelens_thresholds(model: DMSAEModel) -> torch.Tensor:
    """[K] JumpReLU thresholds of eval-mode ``encode``: 0 (plain ReLU) for the latents BatchTopK
    never masks (the dense core, ``DMSAEModel._unmasked_columns``), the inference threshold for the others."""
    config = model.config
    if config.threshold < 0:
        raise ValueError(
            "this DMSAE has no inference threshold yet (config.threshold < 0), so it has no eval-mode encode to "
            "export; export a trained SAE (a run's cycles/* or transfer/* folder)"
        )
    thresholds = torch.full((config.num_latents,), float(config.threshold), dtype=torch.float64)
    thresholds[: model._unmasked_columns()] = 0.0
    return thresholds


def saelens_state_dict(model: DMSAEModel) -> dict[str, torch.Tensor]:
    """SAELens JumpReLU tensors computing exactly ``model``'s eval-mode encode and decode.

    DMSAE: h = (x / n - b_dec) W_enc + b_enc, x^ = n (f W_dec + b_dec), n the normalisation factor.
    SAELens (apply_b_dec_to_input): h = (x - b_dec') W_enc' + b_enc', x^ = f W_dec' + b_dec'.
    With b_dec' = n b_dec, W_enc' = W_enc / n, W_dec' = n W_dec and b_enc' = b_enc the two are the
    same functions and the latents f the same numbers (computed in float64, stored in the model's dtype).
    """
    n = float(model.config.normalization_factor)
    with torch.no_grad():
        tensors = {
            "W_enc": model.W_enc.double() / n,
            "b_enc": model.b_enc.double(),
            "W_dec": model.W_dec.double() * n,
            "b_dec": model.b_dec.double() * n,
            "threshold": saelens_thresholds(model),
        }
    return {name: tensor.to(model.W_dec.dtype).cpu().contiguous() for name, tensor in tensors.items()}


def saelens_cfg(config: DMSAEConfig, dtype: torch.dtype, context_size: int | None, prepend_bos: bool | None) -> dict[str, Any]:
    """SAELens 6's cfg.json of the export: JumpReLUSAEConfig fields, and in ``metadata`` what SAELens
    and SAEBench read to feed the SAE (model_name, hook_name, context_size, prepend_bos) plus the
    DMSAE configuration the import reads back."""
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": config.base_model_id,
        "hook_name": config.hook_name,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        # Without the local path from_pretrained recorded: the export is the same wherever it is written.
        DMSAE_METADATA_KEY: {key: value for key, value in config.to_dict().items() if key != "_name_or_path"},
    }
    return {
        "architecture": "jumprelu",
        "d_in": config.d_in,
        "d_sae": config.num_latents,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {name: value for name, value in metadata.items() if value is not None},
    }


def to_saelens(
    model: DMSAEModel,
    destination: str | os.PathLike,
    *,
    context_size: int | None = None,
    prepend_bos: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``), which
    ``sae_lens.SAE.load_from_disk(destination)`` loads as a JumpReLU SAE equal to the model's eval mode.

    Args:
        context_size, prepend_bos: how the base model's text was fed (the run's ``data.context_length``
            and whether each context starts with BOS); SAELens and SAEBench tokenize that way.
        overwrite: replace an existing ``destination``.
    """
    destination = Path(destination)
    state = saelens_state_dict(model)
    cfg = saelens_cfg(model.config, model.W_dec.dtype, context_size, prepend_bos)

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        save_file(state, str(folder / SAELENS_WEIGHTS))
        (folder / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    write_folder_atomically(destination, write, overwrite)
    return destination


def from_saelens_export(
    state: dict[str, torch.Tensor], exported: dict[str, Any], source: str, base_model_id: str | None, hook_module: str | None
) -> DMSAEModel:
    """The DMSAE that :func:`to_saelens` exported, rebuilt from its weights and ``metadata.dmsae_config``
    (core, lineage, Matryoshka groups, k, threshold): :func:`saelens_state_dict` inverted."""
    fields = dict(exported)
    if base_model_id is not None:
        fields["base_model_id"] = base_model_id
    if hook_module is not None:  # the layer and TransformerLens name follow the new module
        fields.update(hook_module=hook_module, hook_layer=None, hook_name=None)
    config = DMSAEConfig.from_dict(fields)
    model = DMSAEModel(config).to(state["W_dec"].dtype)
    if list(state["threshold"].shape) != [config.num_latents] or not torch.equal(
        state["threshold"], saelens_thresholds(model).to(state["threshold"].dtype)
    ):
        raise ValueError(
            f"{source}: the JumpReLU thresholds are not the ones the exported DMSAE configuration implies (0 for the dense "
            f"core, {config.threshold} for the rest): the weights were edited after the export; re-export the DMSAE"
        )
    n, c = float(config.normalization_factor), config.core_size
    W_enc = state["W_enc"].double() * n
    with torch.no_grad():
        model.core_encoder.copy_(W_enc[:, :c].T)
        model.encoder.copy_(W_enc[:, c:].T)
        model.b_enc.copy_(state["b_enc"])
        model.W_dec.copy_(state["W_dec"].double() / n)
        model.b_dec.copy_(state["b_dec"].double() / n)
    return model.eval()


# ----------------------------------------------------------------------------------------
# Either format, and the CLI
# ----------------------------------------------------------------------------------------


def from_checkpoint(path: str | os.PathLike, **options: Any) -> DMSAEModel:
    """Import whichever format ``path`` holds (SAELens when it has ``sae_weights.safetensors``)."""
    if (Path(path) / SAELENS_WEIGHTS).is_file():
        return from_saelens(path, **options)
    if "k" in options or "norm_scaling_factor" in options:
        raise ValueError(f"{path} is a dictionary_learning checkpoint, which records k and needs no norm scaling factor")
    return from_dictionary_learning(path, **options)


class HubFolder(NamedTuple):
    """A folder of a Hub repo, spelled ``ORG/NAME[@REVISION][:SUBFOLDER]``."""

    repo_id: str
    revision: str | None = None  # None: the default branch
    subfolder: str = ""  # "": the whole repo

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.subfolder}" if self.subfolder else "")


HUB_FOLDER_SPEC = "ORG/NAME[@REVISION][:SUBFOLDER]"


def parse_hub_folder(spec: str) -> HubFolder | None:
    """``ORG/NAME[@REVISION][:SUBFOLDER]`` as a HubFolder; None when ``spec`` is not one (a repo id has
    no ':', a git revision neither)."""
    head, _, subfolder = spec.partition(":")
    repo_id, at, revision = head.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubFolder(repo_id, revision or None, subfolder.strip("/"))


class HubDownloadError(ValueError):
    """A Hub folder that cannot be had (no such repo, revision or folder; offline and not cached):
    the message names it and the fix."""


def download_hub_folder(folder: HubFolder, files: Sequence[str] | None = None, **hub_options: Any) -> Path:
    """The local copy of ``folder`` (only its ``files`` when given) in the Hugging Face cache, fetched
    there unless HF_HUB_OFFLINE is set. ``hub_options``: snapshot_download's cache_dir, token."""
    prefix = f"{folder.subfolder}/" if folder.subfolder else ""
    patterns = [prefix + name for name in files] if files else ([prefix + "*"] if prefix else None)
    try:
        snapshot = snapshot_download(folder.repo_id, revision=folder.revision, allow_patterns=patterns, **hub_options)
    except RevisionNotFoundError:
        raise HubDownloadError(f"{folder.repo_id} has no branch or tag {folder.revision}") from None
    except RepositoryNotFoundError:
        raise HubDownloadError(
            f"no repo {folder.repo_id} on the Hub: check the name, or set HF_TOKEN (hf auth login) if it is private"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise HubDownloadError(
            f"{folder} is not in the Hugging Face cache and the Hub cannot be reached ({type(error).__name__}): "
            "download it once online (unset HF_HUB_OFFLINE) or pass a local path"
        ) from None
    local = Path(snapshot) / folder.subfolder
    if not local.is_dir():
        raise HubDownloadError(f"{folder.repo_id} has no folder {folder.subfolder!r}: name one of its folders after the ':'")
    return local


def write_folder_atomically(destination: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """``write(staging)`` into a sibling staging folder, then rename it into place: a crash leaves either
    nothing or a complete folder, never a half-written one (and an overwritten folder is put back)."""
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; pass --overwrite to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging, retired = (destination.with_name(f".{destination.name}.{suffix}-{tag}") for suffix in ("partial", "old"))
    try:
        write(staging)
        if destination.exists():
            os.replace(destination, retired)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not destination.exists():
            os.replace(retired, destination)  # put the previous folder back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def save_pretrained_atomically(model: DMSAEModel, destination: Path, overwrite: bool) -> None:
    """``model.save_pretrained(destination)`` through :func:`write_folder_atomically`."""
    write_folder_atomically(destination, lambda folder: model.save_pretrained(folder), overwrite)


@dataclass
class ConvertArgs:
    """Convert a dictionary_learning / SAEBench or SAELens Matryoshka BatchTopK SAE into a
    cycle-0 DMSAE folder that AutoModel.from_pretrained loads, or (--to saelens) a DMSAE into
    SAELens's format."""

    source: str = simple_parsing.field(positional=True)
    """ae.pt file, dictionary_learning trainer folder, SAELens folder (sae_weights.safetensors + cfg.json),
    or (--to saelens) a DMSAE folder written by save_pretrained; local, or on the Hub as
    ORG/NAME[@REVISION][:SUBFOLDER]."""
    destination: str = simple_parsing.field(positional=True)
    """Folder to write."""
    to: str = simple_parsing.field(default="dmsae", choices=["dmsae", "saelens"])
    """Output format: dmsae (save_pretrained) or saelens (cfg.json + sae_weights.safetensors, JumpReLU)."""
    k: int | None = None
    """SAELens only: BatchTopK's k when cfg.json does not record it."""
    norm_scaling_factor: float | None = None
    """SAELens only: the scaling factor of normalize_activations = 'expected_average_only_in'."""
    allow_non_unit_decoder: bool = False
    """Keep decoder rows with differing norms unchanged instead of refusing."""
    base_model_id: str | None = None
    """Override the base model recorded in the checkpoint's config."""
    hook_module: str | None = None
    """Override the transformers module whose output the SAE reads."""
    context_size: int | None = None
    """--to saelens: tokens per context the SAE was trained on (the run's data.context_length)."""
    prepend_bos: bool | None = None
    """--to saelens: whether each context starts with BOS (SAELens / SAEBench tokenize that way)."""
    overwrite: bool = False
    """Replace the destination folder if it exists."""


def is_dmsae_folder(path: str | os.PathLike) -> bool:
    config = Path(path) / DICTIONARY_LEARNING_CONFIG  # both name it config.json
    return config.is_file() and read_json(config).get("model_type") == DMSAEConfig.model_type


def local_source(source: str) -> str:
    """``source`` when it is a local path (or names nothing: the readers say what is missing), else
    the Hub folder it names, downloaded; a Hub failure exits with one line."""
    folder = None if Path(source).exists() else parse_hub_folder(source)
    if folder is None:
        return source
    try:
        return str(download_hub_folder(folder))
    except HubDownloadError as error:
        raise SystemExit(f"convert_checkpoints: error: {source}: {error}") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = simple_parsing.parse(ConvertArgs, args=argv)
    args.source = local_source(args.source)
    options = {
        name: getattr(args, name)
        for name in ("k", "norm_scaling_factor", "base_model_id", "hook_module")
        if getattr(args, name) is not None
    }
    if args.to == "saelens" and is_dmsae_folder(args.source):
        if options:
            raise ValueError(f"{args.source} is a DMSAE folder: {sorted(options)} apply only to imports; drop them")
        model = DMSAEModel.from_pretrained(args.source).eval()
    else:
        model = from_checkpoint(args.source, allow_non_unit_decoder=args.allow_non_unit_decoder, **options)
    if args.to == "saelens":
        to_saelens(model, args.destination, context_size=args.context_size, prepend_bos=args.prepend_bos, overwrite=args.overwrite)
    else:
        save_pretrained_atomically(model, Path(args.destination), args.overwrite)
    config = model.config
    print(
        f"wrote {args.destination} ({args.to}): d_in={config.d_in}, K={config.num_latents}, k={config.k}, "
        f"groups={config.group_sizes}, threshold={config.threshold}, hook={config.base_model_id}:{config.hook_module}"
    )


if __name__ == "__main__":
    main()
