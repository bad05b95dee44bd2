"""SAEBench's ``absorption`` eval (first-letter feature absorption) on the final SAEs of a finished run.

Runs in SAEBench's own environment (``bash bench/setup_saebench.sh`` builds ``.saebench-venv``):

    .saebench-venv/bin/python bench/saebench_absorption.py RUN_DIR [--saes 'transfer/*'] [--out DIR]
        [--letters a b c] [--max-tokens N] [--device cuda]

The base model, the SAEs' SAELens export and the TransformerLens model come from ``saebench_core.py``
(its helpers are imported). SAEBench's absorption eval needs no data besides the vocabulary:

1. a 26-way linear first-letter probe, trained on the hook's activations at the word of ICL prompts
   ("{word} has the first letter: W", ten examples) over the model's alphabetic vocabulary tokens (80% train,
   20% test);
2. per SAE, k-sparse probes (k = 1..10) on the SAE's latents for each letter; a jump of the F1 by 0.03 or
   more from k-1 to k marks feature splitting (the "split features");
3. per letter, on the test words the probe gets right, how much of the probe's projection the split
   features miss and other latents take over: the absorption fraction and the full-absorption rate.

With no options it is SAEBench's full eval (all alphabetic tokens, all 26 letters, SAEBench's defaults).
``--max-tokens N`` samples about N of the alphabetic tokens (seeded, stratified by first letter, at least 25
a letter) for every stage, ``--letters`` restricts
stage 3 (and the means) to those letters; the probes of stages 1-2 are still 26-way, as in SAEBench.
Unlike SAEBench's ``run_eval`` it writes under ``--out`` only (no ``artifacts/`` in the working directory or
the package), keys the cached probes by the vocabulary subset, and does not stop at an SAE with too few
first-letter features (it records that). Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from saebench_core import hooked_transformer, local_hf_checkpoint, log, with_saelens5_attributes

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def environment():
    """SAEBench's absorption modules, or a one-line exit naming the fix."""
    try:
        from sae_bench.evals.absorption import common, feature_absorption, k_sparse_probing, main
        from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    except ImportError as error:
        raise SystemExit(f"SAEBench is not importable here ({error}): run `bash bench/setup_saebench.sh` and use .saebench-venv/bin/python")
    return common, feature_absorption, k_sparse_probing, main, AbsorptionEvalConfig


def stop_after(model, layer: int) -> None:
    """Every forward pass of the eval reads ``blocks.{layer}.hook_resid_post`` alone, through ``run_with_cache``:
    stop there (the same activations; the later layers and the unembedding are most of the model's cost)."""
    run_with_cache = model.run_with_cache
    model.run_with_cache = functools.partial(run_with_cache, stop_at_layer=layer + 1)


@torch.no_grad()
def same_logits(base_model, model, tokenizer) -> dict:
    """The TransformerLens model against the run's base model (transformers) on a few ICL prompts: the
    probe trains on TransformerLens's activations, so a wrong RoPE base or weight conversion shows here."""
    text = "".join(f" {word} has the first letter: {word[0].upper()}\n" for word in ("cat", "dog", "apple", "house", "river", "zebra"))
    ids = tokenizer(text, return_tensors="pt").input_ids
    ours, theirs = base_model(ids).logits, model(ids)
    return {
        "tokens": ids.shape[1], "rotary_base": model.cfg.rotary_base,
        "max_abs_logit_diff": float((ours - theirs).abs().max()),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }


def sample_vocabulary(tokens: list[str], size: int, seed: int, per_letter: int = 25) -> list[str]:
    """``size`` of the alphabetic tokens, stratified by first letter (each letter's share of the vocabulary,
    at least ``per_letter`` each): SAEBench's probes weight each letter by its negatives / positives, so a
    letter missing from the probe's training words makes its loss NaN (q, x, z in a plain sample of 1,000)."""
    rng = random.Random(seed)
    by_letter: dict[str, list[str]] = {}
    for token in tokens:
        by_letter.setdefault(token.strip()[0].lower(), []).append(token)
    chosen = []
    for letter in sorted(by_letter):
        words = by_letter[letter]
        chosen += rng.sample(words, min(len(words), max(per_letter, round(size * len(words) / len(tokens)))))
    rng.shuffle(chosen)
    return chosen


def restrict_vocabulary(common, feature_absorption, vocabulary: list[str]) -> None:
    """Every stage reads the alphabetic tokens through ``get_alpha_tokens``: give it the chosen subset."""
    common.get_alpha_tokens = feature_absorption.get_alpha_tokens = lambda *_args, **_kwargs: list(vocabulary)


def restrict_letters(feature_absorption, letters: str) -> None:
    """Stage 3 runs the model on the probe's true positives of every letter it is handed: only ``letters``."""
    every_letter = feature_absorption.get_stats_and_likely_false_negative_tokens

    def chosen_letters(*args, **kwargs):
        return {letter: stats for letter, stats in every_letter(*args, **kwargs).items() if letter in letters}

    feature_absorption.get_stats_and_likely_false_negative_tokens = chosen_letters


@torch.no_grad()
def probe_accuracy(common, model, layer: int, probes_dir: Path, device: str) -> dict:
    """The 26-way first-letter probe on its held-out 20% of the vocabulary."""
    probe = common.load_probe(model.cfg.model_name, layer, probes_dir, torch.float32, device)
    activations, labels = common.load_probe_data_split(model, layer, "test", probes_dir, torch.float32, device)
    answers = torch.tensor([label for _, label in labels], device=device)
    predicted = probe(activations).argmax(-1)
    return {"test_words": len(labels), "accuracy": float((predicted == answers).float().mean())}


def evaluate_sae(modules, config, model, sae, name: str, work: Path, device: str, letters: str) -> dict:
    """What SAEBench's ``run_eval`` does for one SAE, with every file under ``work``."""
    common, feature_absorption, k_sparse_probing, main, _ = modules
    layer = sae.cfg.hook_layer
    common_args = dict(
        model=model, sae=sae, layer=layer, sae_name=name, max_k_value=config.max_k_value,
        prompt_template=config.prompt_template, prompt_token_pos=config.prompt_token_pos, device=device,
        probes_dir=work / "probes",
    )
    started = time.time()
    probing = k_sparse_probing.run_k_sparse_probing_experiment(
        **common_args, experiment_dir=work / "k_sparse_probing",
        f1_jump_threshold=config.f1_jump_threshold, k_sparse_probe_l1_decay=config.k_sparse_probe_l1_decay,
        k_sparse_probe_batch_size=config.k_sparse_probe_batch_size, k_sparse_probe_num_epochs=config.k_sparse_probe_num_epochs,
        eval_batch_size=config.eval_k_sparse_probe_batch_size, precalc_k_sparse_probe_sae_acts=config.precalc_k_sparse_probe_sae_acts,
    )
    probing_seconds = time.time() - started
    probe_f1 = dict(zip(probing["letter"], probing["f1_probe"]))
    result = {
        "probe_f1": {letter: float(probe_f1[letter]) for letter in letters},
        "letters_with_probe_f1_above_min": int((probing["f1_probe"] > config.min_GT_probe_f1).sum()),
        "k_sparse_probing_seconds": probing_seconds,
    }
    if result["letters_with_probe_f1_above_min"] < config.min_feats_for_eval:
        result["error"] = f"fewer than {config.min_feats_for_eval} letters with probe F1 > {config.min_GT_probe_f1}: SAEBench does not evaluate absorption"
        return result
    started = time.time()
    raw = feature_absorption.run_feature_absortion_experiment(
        **common_args, experiment_dir=work / f"feature_absorption-{letters}",
        sparse_probing_experiment_dir=work / "k_sparse_probing",
        feature_split_f1_jump_threshold=config.f1_jump_threshold, batch_size=config.llm_batch_size,
    )
    result["feature_absorption_seconds"] = time.time() - started
    # SAEBench's aggregation (run_eval): letters whose probe F1 exceeds min_GT_probe_f1, then the mean.
    details = [
        {
            "first_letter": row["letter"],
            "mean_absorption_fraction": float(row["mean_absorption_fraction"]),
            "full_absorption_rate": float(row["full_absorption_rate"]),
            "num_full_absorption": int(row["num_full_absorption"]),
            "num_probe_true_positives": float(row["num_probe_true_positives"]),
            "num_split_features": int(row["num_split_feats"]),
        }
        for _, row in main._aggregate_results_df(raw).iterrows()
        if probe_f1[row["letter"]] > config.min_GT_probe_f1
    ]
    result["details"] = details
    keys = {"mean_absorption_fraction_score": "mean_absorption_fraction", "mean_full_absorption_score": "full_absorption_rate",
            "mean_num_split_features": "num_split_features"}
    result["mean"] = {key: statistics.mean(d[field] for d in details) if details else None for key, field in keys.items()}
    result["std_dev"] = {key: statistics.stdev(d[field] for d in details) if len(details) > 1 else None for key, field in keys.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--saes", nargs="+", default=["transfer/*"], help="globs of SAE folders under RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/saebench_absorption")
    parser.add_argument("--letters", nargs="+", default=list(LETTERS), help="letters whose absorption is measured (default: all 26)")
    parser.add_argument("--max-tokens", type=int, default=None, help="sample this many alphabetic vocabulary tokens (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=None, help="default: SAEBench's random_seed (42)")
    parser.add_argument("--min-letters", type=int, default=None,
                        help="letters with probe F1 > 0.6 needed to score absorption (default: SAEBench's min_feats_for_eval, 20)")
    parser.add_argument("--llm-batch-size", type=int, default=None, help="prompts per forward pass in stage 3 (default: SAEBench's 10)")
    args = parser.parse_args()

    modules = environment()
    common, feature_absorption, _, _, AbsorptionEvalConfig = modules
    from sae_lens import SAE

    from hub_cards.publish import saelens_export_settings
    from modeling_dmsae import DMSAEModel
    from modeling_dmsae.convert_checkpoints import to_saelens
    from trainer.harvest.base_model import load_base_model
    from trainer.run.layout import METRICS_JSON, RunDirectory

    letters = "".join(sorted({letter.lower() for letter in args.letters}))
    if not letters or any(letter not in LETTERS for letter in letters):
        raise SystemExit(f"--letters takes single letters a-z, got {args.letters}")
    if not (args.run_dir / "run_config.yaml").is_file():
        raise SystemExit(f"{args.run_dir} is not a run folder (no run_config.yaml): pass a finished run's folder, e.g. runs/default")
    sae_dirs = sorted({p for pattern in args.saes for p in args.run_dir.glob(pattern) if (p / METRICS_JSON).exists()})
    if not sae_dirs:
        raise SystemExit(f"no finished SAE (a folder with {METRICS_JSON}) matches {args.run_dir}/{' '.join(args.saes)}: finish the run's transfer stage or fix --saes")

    config = AbsorptionEvalConfig(model_name="", llm_dtype="float32")
    if args.seed is not None:
        config.random_seed = args.seed
    if args.min_letters is not None:
        config.min_feats_for_eval = args.min_letters
    if args.llm_batch_size is not None:
        config.llm_batch_size = args.llm_batch_size
    # Precomputing the SAE's latents for the k-sparse probes changes no number, only the time (SAEBench
    # recommends it for small SAEs); off by default in SAEBench for 65k-wide SAEs' memory.
    config.precalc_k_sparse_probe_sae_acts = True
    random.seed(config.random_seed)
    np.random.seed(config.random_seed)
    torch.manual_seed(config.random_seed)

    out = args.out or args.run_dir / "saebench_absorption"
    out.mkdir(parents=True, exist_ok=True)
    run_config = RunDirectory(args.run_dir).configuration()
    log(f"loading the base model ({run_config.model.model_id})")
    base_model, tokenizer = load_base_model(dataclasses.replace(run_config.model, device="cpu", dtype="float32"))
    model_dir = local_hf_checkpoint(base_model, tokenizer, out / "base_model_hf")
    model = hooked_transformer(model_dir)
    model_check = same_logits(base_model, model, tokenizer)
    log(f"TransformerLens model against the base model: {json.dumps(model_check)}")
    del base_model
    model = model.to(args.device)
    config.model_name = model.cfg.model_name

    every_token = common.get_alpha_tokens(model.tokenizer)
    vocabulary = every_token if args.max_tokens is None else sample_vocabulary(every_token, args.max_tokens, config.random_seed)
    restrict_vocabulary(common, feature_absorption, vocabulary)
    restrict_letters(feature_absorption, letters)
    subset = {
        "alphabetic_tokens": len(every_token), "tokens_used": len(vocabulary), "letters": letters,
        "seed": config.random_seed, "device": args.device,
    }
    log(f"subset: {json.dumps(subset)}")
    # Everything trained on the vocabulary subset (probe, its activations, k-sparse probes) is cached by it.
    work = out / f"vocab-{len(vocabulary)}-seed-{config.random_seed}"

    export_settings = saelens_export_settings(run_config.data)

    def exported(sae_dir: Path):
        sae = DMSAEModel.from_pretrained(sae_dir).eval()
        export_dir = to_saelens(sae, out / "saelens" / sae_dir.name, overwrite=True, **export_settings)
        exported_sae = with_saelens5_attributes(SAE.load_from_disk(export_dir)).to(device=args.device, dtype=torch.float32)
        # SAEBench assumes unit decoder rows (a latent's activation is its write along its direction); the
        # export's rows carry the normalisation factor. Folding the norms into the encoder and threshold
        # leaves the SAE's function unchanged; SAEBench's run_eval does the same to a pretrained SAE.
        exported_sae.fold_W_dec_norm()
        return exported_sae

    layer = exported(sae_dirs[0]).cfg.hook_layer
    stop_after(model, layer)
    started = time.time()
    random.seed(config.random_seed)  # the probe's train/test split and ICL examples
    common.load_or_train_probe(model, config.prompt_template, config.prompt_token_pos, layer, work / "probes", torch.float32, args.device)
    probe = probe_accuracy(common, model, layer, work / "probes", args.device)
    probe["seconds"] = time.time() - started
    log(f"first-letter probe (layer {layer}): {json.dumps(probe)}")

    results = {"subset": subset, "model_check": model_check, "eval_config": dataclasses.asdict(config), "probe": probe, "saes": {}}
    results_file = out / "results.json"  # SAEs already evaluated on the same subset and settings are kept
    if results_file.exists():
        earlier = json.loads(results_file.read_text())
        if (earlier["subset"], earlier["eval_config"]) == (subset, results["eval_config"]):
            results["saes"] = earlier["saes"]
    for sae_dir in sae_dirs:
        name = sae_dir.name
        if name in results["saes"]:
            continue
        sae = exported(sae_dir)
        started = time.time()
        random.seed(config.random_seed)  # stage 3's ICL examples
        result = evaluate_sae(modules, config, model, sae, name, work, args.device, letters)
        result["seconds"] = time.time() - started
        results["saes"][name] = result
        results_file.write_text(json.dumps(results, indent=2))
        log(f"{name}: {json.dumps(result.get('mean') or result.get('error'))} ({result['seconds']:.0f} s)")
        (out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))


def markdown_table(results: dict) -> str:
    subset, probe, config = results["subset"], results["probe"], results["eval_config"]
    first = next(iter(results["saes"].values()))
    f1 = ", ".join(f"{letter} {value:.2f}" for letter, value in first["probe_f1"].items())
    lines = [
        f"Vocabulary: {subset['tokens_used']} of {subset['alphabetic_tokens']} alphabetic tokens; letters: "
        f"{' '.join(subset['letters'])}; seed {subset['seed']}. First-letter probe (26-way): accuracy "
        f"{probe['accuracy']:.3f} on {probe['test_words']} held-out words; its F1 per letter: {f1}. Letters scored: "
        f"those with probe F1 > {config['min_GT_probe_f1']}, {first['letters_with_probe_f1_above_min']} of 26 (SAEBench "
        f"scores an SAE only if at least 20; here at least {config['min_feats_for_eval']}). Means over the letters scored, "
        "± the standard deviation across them.",
        "",
        "| SAE | mean absorption fraction | mean full-absorption score | mean split features | letters scored | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in sorted(results["saes"].items()):
        if "error" in result:
            lines.append(f"| {name} | {result['error']} | | | | {result['seconds']:.0f} |")
            continue
        cells = [
            f"{result['mean'][key]:.3f} ± {result['std_dev'][key]:.3f}" if result["std_dev"][key] is not None
            else ("n/a" if result["mean"][key] is None else f"{result['mean'][key]:.3f}")
            for key in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {len(result['details'])} | {result['seconds']:.0f} |")
    return "\n".join(lines + over_seeds(results["saes"])) + "\n"


SCORES = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")


def over_seeds(saes: dict[str, dict]) -> list[str]:
    """The table over training seeds: each SAE whose folder differs only in its -seed-S suffix (the
    run's transfer seeds), mean [min, max] of its mean over letters; nothing when no SAE has seeds."""
    groups: dict[str, list[dict]] = {}
    for name, result in sorted(saes.items()):
        if "error" not in result:
            groups.setdefault(re.sub(r"-seed-\d+$", "", name), []).append(result["mean"])
    if all(len(means) < 2 for means in groups.values()):
        return []
    lines = [
        "", "Over the training seeds (mean [min, max] of each SAE's mean over letters):", "",
        "| SAE | seeds | mean absorption fraction | mean full-absorption score | mean split features |", "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, means in groups.items():
        cells = [
            f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in ([m[key] for m in means] for key in SCORES)
        ]
        lines.append(f"| {name} | {len(means)} | {' | '.join(cells)} |")
    return lines


if __name__ == "__main__":
    main()
