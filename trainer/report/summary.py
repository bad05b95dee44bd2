"""The end of a run: every metric in one file, the figures, and SUMMARY.md with the results.

SUMMARY.md answers what a reviewer checks first: which positions reached the SAEs, each cycle's
core and health, each final SAE against the plain Matryoshka baseline at the same k, the
paper's Figure 3 stated in words, the sparsity-fidelity plane (Figure 4's analogue) and feature
consistency across sparsities. The terminal gets the same tables.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import NamedTuple

from modeling_dmsae import DMSAEModel
from trainer.config import DistillConfig
from trainer.report.browser import build_browser
from trainer.report.figures import (
    ConsistencyBar,
    SparsityPoint,
    consistency_figure,
    core_lineage_figure,
    coverage_figure,
    l0_core_figure,
    sparsity_fidelity_figure,
)
from trainer.run.files import read_json, write_json, write_text
from trainer.run.layout import BROWSER_FOLDER, BROWSER_INDEX, CORE_JSON, METRICS_JSON, RunDirectory, figure_file
from trainer.run.logs import read_curve
from trainer.run.plan import FinalRun, final_runs
from trainer.sae.metrics import MATCH_COSINE, chance_max_cosine, decoder_consistency

FAMILIES = {("distilled", "dense_core"): "DMSAE (dense core)", ("distilled", "sparse_core"): "DMSAE (sparse core)"}
FAMILIES.update({("none", "dense_core"): "Matryoshka baseline", ("random", "dense_core"): "random core"})
# Below this margin over random directions, a mean best match says nothing: it moves by a few
# hundredths between unrelated dictionaries.
CHANCE_MARGIN = 0.05
# Above this median cosine to its initialisation, most of a dictionary has not learned anything yet.
UNDERTRAINED_COSINE = 0.8


def family(metrics: dict) -> str:
    return FAMILIES[(metrics["core"], metrics["variant"])]


def batchtopk_l0(metrics: dict) -> float:
    """The measured L0 of the latents BatchTopK budgets (non-core for a dense core, all otherwise),
    to hold against its target ``k_noncore``."""
    dense_core = metrics.get("variant", "dense_core") == "dense_core" and metrics.get("core_size", 0) > 0
    return metrics["l0_noncore"] if dense_core else metrics["l0"]


def collect_metrics(paths: RunDirectory, runs: list[FinalRun]) -> dict:
    """{"cycles": {name: metrics}, "transfer": {name: metrics}}."""
    metrics = {"cycles": {}, "transfer": {}}
    for folder in paths.cycles():
        metrics["cycles"][folder.name] = read_json(folder / METRICS_JSON)
    for run in runs:
        folder = paths.transfer(run.name)
        if folder.exists():
            metrics["transfer"][run.name] = read_json(folder / METRICS_JSON)
    return metrics


# ---- feature consistency across sparsities --------------------------------------------------


def consistency_across_sparsities(paths: RunDirectory, runs: list[FinalRun], core_size: int) -> list[dict]:
    """Decoder-direction matches for every pair of final SAEs of one family at different k: the
    DMSAEs (dense core) and the baselines, whose first |C*| latents stand in for a core (the start
    of the most nested prefix, where a Matryoshka SAE keeps its most general features)."""
    results = []
    for core in ("distilled", "none"):
        members = sorted((r for r in runs if r.core == core and r.variant == "dense_core"), key=lambda r: r.k)
        members = [r for r in members if paths.transfer(r.name).exists()]
        models = {r.name: DMSAEModel.from_pretrained(paths.transfer(r.name)) for r in members}
        for a, b in combinations(members, 2):
            match = decoder_consistency(models[a.name], models[b.name], core_size)
            chance = chance_max_cosine(models[b.name])
            results.append({"family": FAMILIES[(core, "dense_core")], "k_a": a.k, "k_b": b.k, **match, "chance_mean_max_cosine": chance})
    return results


# ---- the Figure-3 outcome ----------------------------------------------------------------------


class CoreUsage(NamedTuple):
    start: float  # mean L0_core over the first tenth of the logged steps
    end: float  # mean L0_core over the last tenth
    held_out: float  # L0_core on held-out tokens, inference threshold


def _core_usage(paths: RunDirectory, run: FinalRun, metrics: dict) -> CoreUsage | None:
    _, curve = read_curve(paths.log(run.stage), "l0_core")
    if not curve or run.name not in metrics:
        return None
    tenth = max(1, len(curve) // 10)
    return CoreUsage(sum(curve[:tenth]) / tenth, sum(curve[-tenth:]) / tenth, metrics[run.name]["l0_core"])


def _core_biases(paths: RunDirectory, run: FinalRun) -> str:
    """How many core encoder biases ended positive, and their mean: in the dense-core variant nothing
    penalises core activity, so a positive bias lets a core latent fire on most tokens."""
    sae = DMSAEModel.from_pretrained(paths.transfer(run.name))
    core = sae.b_enc.detach()[: sae.config.core_size]
    return f"{int((core > 0).sum())} of {len(core)} positive (mean {float(core.mean()):+.3f})"


def figure3_outcome(paths: RunDirectory, config: DistillConfig, transfer_metrics: dict) -> str | None:
    """Figure 3 in words: did the random core's L0_core fall during training, and did the distilled
    core end above it? Measured, never tuned for."""
    k = config.cycles.k
    distilled_run, random_run = FinalRun.of(k, "dense_core", "distilled"), FinalRun.of(k, "dense_core", "random")
    distilled = _core_usage(paths, distilled_run, transfer_metrics)
    random = _core_usage(paths, random_run, transfer_metrics)
    if distilled is None or random is None:
        return None
    c = transfer_metrics[random_run.name]["core_size"]
    fell = random.end < 0.9 * random.start
    above = distilled.end > random.end
    agrees = fell and above
    # A random core that never fired early on has no relative change to state.
    change = f"{(random.end / random.start - 1) * 100:+.0f}%" if random.start > 0 else "it did not fire in the first tenth"
    fidelity = {name: transfer_metrics[run.name] for name, run in (("distilled", distilled_run), ("random", random_run))}
    return (
        f"At k = {k}, both cores of {c} latents, frozen encoder rows of the same norms started the same way "
        f"(DMSAEModel.from_core: the decoder unrelated to them); only the directions differ. "
        f"The random core's L0_core went from {random.start:.1f} "
        f"(first tenth of training) to {random.end:.1f} (last tenth): it "
        f"{'fell' if fell else 'did not fall'} ({change}). "
        f"The distilled core went from {distilled.start:.1f} to {distilled.end:.1f} and ended "
        f"{'above' if above else 'below'} the random core. On held-out tokens L0_core is {distilled.held_out:.1f} "
        f"(distilled) against {random.held_out:.1f} (random). The paper reports a random core driven toward "
        f"0 while a distilled core keeps firing: this run {'agrees' if agrees else 'does not reproduce that'}. "
        f"Held-out FVE {fidelity['distilled']['fve']:.3f} (distilled) against {fidelity['random']['fve']:.3f} (random), "
        f"loss recovered {fidelity['distilled']['loss_recovered']:.3f} against {fidelity['random']['loss_recovered']:.3f} "
        "(one seed: no spread to judge a small difference by). "
        f"Core encoder biases after training: random core {_core_biases(paths, random_run)}, "
        f"distilled core {_core_biases(paths, distilled_run)}."
    )


# ---- figures -----------------------------------------------------------------------------------


def draw_figures(config: DistillConfig, paths: RunDirectory, metrics: dict, consistency: list[dict]) -> list[Path]:
    figures = []
    cores = [read_json(folder / CORE_JSON) for folder in paths.cycles()]
    if cores:
        origins = [[origin for origin, _ in core["lineage"]] for core in cores]
        figures.append(core_lineage_figure(origins, paths.figure("core_lineage")))
        curves = {f"cycle {core['cycle']}": core["coverage_curve"] for core in cores}
        figures.append(coverage_figure(curves, config.cycles.tau, paths.figure("coverage_curve")))
    k = config.cycles.k
    distilled = paths.log(FinalRun.of(k, "dense_core", "distilled").stage)
    random_core = paths.log(FinalRun.of(k, "dense_core", "random").stage)
    if distilled.exists() and random_core.exists():
        curves = {
            "distilled core": read_curve(distilled, "l0_core"),
            "random core": read_curve(random_core, "l0_core"),
        }
        figures.append(l0_core_figure(curves, paths.figure("l0_core")))
    points = [
        SparsityPoint(family(m), m["k"], m["l0"], m["l0_noncore"], m["loss_recovered"], m["fve"])
        for m in metrics["transfer"].values()
    ]
    if points:
        figures.append(sparsity_fidelity_figure(points, paths.figure("sparsity_fidelity")))
    if consistency:
        bars = [
            ConsistencyBar(
                f"{row['family'].split(' (')[0]} k={row['k_a']} vs {row['k_b']}",
                _fraction(row["core"]), _fraction(row["rest"]), row["core"]["mean_max_cosine"], row["rest"]["mean_max_cosine"],
                row["chance_mean_max_cosine"],
            )
            for row in consistency
        ]  # fmt: skip
        figures.append(consistency_figure(bars, paths.figure("consistency")))
    return figures


def _fraction(part: dict) -> float:
    return part["matched"] / part["latents"] if part["latents"] else float("nan")


# ---- tables ------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _moved(metrics: dict) -> str:
    """The median trainable decoder row's cosine with its initialisation ("" for an imported SAE)."""
    return f"{metrics['decoder_cosine_to_init']:.2f}" if "decoder_cosine_to_init" in metrics else ""


def cycles_table(cycles: dict) -> str:
    rows = [
        [
            name, str(m["core_size"]), str(m["selected_core_size"]),
            "" if m["core_size"] == 0 else f"{m['carry_over']:.2f}",
            f"{m['fve']:.3f}", f"{m['l0_core']:.1f}", f"{batchtopk_l0(m):.1f} / {m['k_noncore']}",
            f"{m['dead_fraction']:.1%}", f"{m['loss_recovered']:.3f}", _moved(m),
        ]
        for name, m in cycles.items()
    ]  # fmt: skip
    header = ["cycle", "frozen core c", "selected C(t)", "carry-over", "FVE", "L0 core", "BatchTopK L0 / target", "dead", "loss recovered", "dec. cos to init"]
    return _table(header, rows)


FAMILY_ORDER = list(FAMILIES.values())


def finals_table(transfer: dict) -> str:
    """One row per final SAE, by family (DMSAEs, sparse core, baselines, random core), then k."""
    baselines = {m["k"]: m for m in transfer.values() if m["core"] == "none"}
    rows = []
    for name, m in sorted(transfer.items(), key=lambda item: (FAMILY_ORDER.index(family(item[1])), item[1]["k"])):
        base = baselines.get(m["k"]) if m["core"] != "none" else None
        versus = f"{m['loss_recovered'] - base['loss_recovered']:+.3f} / {m['fve'] - base['fve']:+.3f}" if base else ""
        rows.append([
            name, family(m), str(m["k"]), str(m["core_size"]), f"{m['l0_core']:.1f}",
            f"{batchtopk_l0(m):.1f} / {m['k_noncore']}", f"{m['l0']:.1f}", f"{m['fve']:.3f}",
            f"{m['dead_fraction']:.1%}", f"{m['loss_recovered']:.3f}", versus, _moved(m),
        ])  # fmt: skip
    header = [
        "SAE", "family", "k", "c", "L0 core", "BatchTopK L0 / target", "L0", "FVE", "dead", "loss recovered",
        "vs baseline: loss rec. / FVE", "dec. cos to init",
    ]  # fmt: skip
    return _table(header, rows)


def consistency_table(consistency: list[dict]) -> str:
    rows = [
        [
            row["family"], f"{row['k_a']} vs {row['k_b']}",
            f"{row['core']['matched']} / {row['core']['latents']}", f"{row['core']['mean_max_cosine']:.3f}",
            f"{row['rest']['matched']} / {row['rest']['latents']}", f"{row['rest']['mean_max_cosine']:.3f}",
            f"{row['chance_mean_max_cosine']:.3f}",
        ]
        for row in consistency
    ]  # fmt: skip
    header = ["family", "k pair", "core matched", "core mean max-cos", "rest matched", "rest mean max-cos", "random directions"]
    return _table(header, rows)


def consistency_outcome(consistency: list[dict], transfer: dict) -> str:
    """What the consistency table can say, in words: the core's agreement across k for each family,
    whether the other latents' matches beat random directions, and how far training moved the
    decoders (a dictionary still at its initialisation has nothing to be consistent about)."""
    by_family: dict[str, list[dict]] = {}
    for row in consistency:
        by_family.setdefault(row["family"], []).append(row)
    core = "; ".join(
        f"{name} {sum(r['core']['mean_max_cosine'] for r in rows) / len(rows):.3f}" for name, rows in by_family.items()
    )
    sentences = [f"Mean best match of the first {consistency[0]['core']['latents']} latents (the core), averaged over the k pairs: {core}."]
    margins = [row["rest"]["mean_max_cosine"] - row["chance_mean_max_cosine"] for row in consistency]
    sentences.append(
        f"Outside the core, the mean best match exceeds what random directions reach by {min(margins):+.3f} to {max(margins):+.3f}"
        + (" (no better than chance: no features measurably shared across k)." if max(margins) < CHANCE_MARGIN else ".")
    )
    moved = [m["decoder_cosine_to_init"] for m in transfer.values() if "decoder_cosine_to_init" in m]
    if moved:
        sentences.append(
            f"The median trainable decoder row of these SAEs keeps cosine {min(moved):.2f} to {max(moved):.2f} with its "
            "random initialisation"
            + (": most of each dictionary is still where it started; train longer to measure consistency." if min(moved) > UNDERTRAINED_COSINE else ".")
        )
    return " ".join(sentences)


def positions_section(harvest: dict) -> str:
    lines = []
    for name, census in (("training cache", harvest.get("training")), ("held-out set", harvest.get("held_out"))):
        if census is None:
            lines.append(f"- {name}: streamed, not counted")
            continue
        excluded = census["excluded"]
        profile = ", ".join(f"{norm:,.0f}" for norm in census["mean_norm_at_position"])
        lines.append(
            f"- {name}: {census['positions']:,} positions read, {census['kept']:,} kept; excluded "
            f"{excluded['special_tokens']:,} special-token positions (BOS, padding) and {excluded['massive_norm']:,} "
            f"massive-norm positions (> {harvest['max_norm_ratio']} x the batch median). Median norm "
            f"{census['median_norm']:,.1f}; mean norm at positions 0-3: {profile}."
        )
    return "\n".join(lines)


FILES = """| path | what it is |
|---|---|
| `cycles/cycle-NNN/` | cycle t's SAE (`AutoModel.from_pretrained`), `core.json` (C(t): latent indices by descending attribution, scores, lineage `[origin_cycle, origin_index]`, coverage curve), `core_directions.safetensors` (the next cycle's frozen core), `metrics.json` |
| `distilled_core/` | C* = C(T) ∩ C(T-1) (`core.json`, `core_directions.safetensors`): the transfer stage's input (`--transfer.core`) |
| `transfer/k-KKKK-VARIANT/` | the final DMSAEs from C* at sparsity k (Algorithm 3), with `metrics.json` |
| `transfer/random-core-k-KKKK/` | the Figure-3 control: a random frozen core of |C*| latents |
| `transfer/baseline-k-KKKK/` | the plain Matryoshka baseline (c = 0) at k: same K, groups, tokens, seed policy |
| `metrics.json` | every metric of every SAE, and feature consistency across sparsities |
| `harvest.json` | which positions reached the SAEs and why others did not; the activation-norm profile |
| `figures/` | the figures above |
| `browser/` | the offline feature browser (`browser/index.html`, opens from disk with no network): every latent of every final SAE, and the distilled core's lineage |
| `*/firing_frequencies.safetensors` | beside every SAE: each latent's firing frequency on the held-out tokens |
| `transfer/*/latent_evidence.*` | beside every final SAE: per latent its mean and max activation, histogram, top and typical held-out contexts, logit effect (format: `trainer/sae/evidence.py`) |
| `logs/STAGE.jsonl` | training curves (loss, L0 core / non-core, dead fraction, BatchTopK's cut) every `run.log_every` steps; `logs/dmsae/`: the same in the tracker's format (tensorboard events by default) |
| `hub/` | the exact folders pushed to the Hub, with their model cards |
| `cache/` | harvested activations and the (x, g) attribution sample (reused by every cycle and by a resumed run) |
| `checkpoints/` | training checkpoints of unfinished stages (`--run.resume true` continues from them) |
| `timings.json` | wall time per kind of work |"""

DEFINITIONS = f"""All metrics on held-out tokens (never trained on), in inference mode: the calibrated threshold,
one token at a time, as users run the SAEs. FVE = 1 - SSE / total variance around the mean; L0
counts active latents per token (core + non-core = global, Eq. 9); "BatchTopK L0 / target" holds
the latents BatchTopK budgets (non-core for a dense core, all otherwise) against k_noncore (Eq. 4);
dead = fires on none of the held-out tokens; loss recovered = (CE_zero - CE_spliced) / (CE_zero -
CE_clean), with the SAE spliced in (or zeros) at the kept positions only; carry-over = the fraction
of a cycle's frozen core it selects again; dec. cos to init = the median cosine between a trainable
decoder row after training and where it started (near 1: the dictionary is mostly still random).
Consistency: a latent is matched when another SAE has a decoder direction with cosine >= {MATCH_COSINE};
"random directions" is the mean best cosine 4,096 random unit vectors reach against the same decoder,
the level a mean max-cos must beat to mean anything."""


BROWSER_LINK = (
    f"**Feature browser**: [{BROWSER_FOLDER}/{BROWSER_INDEX}]({BROWSER_FOLDER}/{BROWSER_INDEX}), offline: every latent of every "
    "final SAE (top and typical held-out contexts, logit effect), and each core latent's lineage across cycles and k."
)


def summary_markdown(config: DistillConfig, paths: RunDirectory, metrics: dict, harvest: dict) -> str:
    sections = [
        "# DMSAE distillation run",
        f"`{paths.root}`; configuration `run_config.yaml` (resume with `--config run_config.yaml --run.resume true`).",
        *([BROWSER_LINK] if (paths.browser / BROWSER_INDEX).exists() else []),
        "## Positions that reached the SAEs\n\n" + positions_section(harvest),
    ]
    if metrics["cycles"]:
        sections.append("## Distillation cycles\n\n" + cycles_table(metrics["cycles"]))
        sections.append(f"![Figure 2]({figure_file('core_lineage')})\n\n![coverage]({figure_file('coverage_curve')})")
    if metrics["transfer"]:
        sections.append("## Final SAEs against the Matryoshka baseline\n\n" + finals_table(metrics["transfer"]))
        sections.append(f"![Figure 4 analogue]({figure_file('sparsity_fidelity')})")
    if metrics.get("figure3"):
        sections.append("## Figure 3: distilled against random core\n\n" + metrics["figure3"])
        sections.append(f"![Figure 3]({figure_file('l0_core')})")
    if metrics.get("consistency"):
        sections.append("## Feature consistency across sparsities\n\n" + consistency_table(metrics["consistency"]))
        sections.append(consistency_outcome(metrics["consistency"], metrics["transfer"]))
        sections.append(f"![consistency]({figure_file('consistency')})")
    sections += ["## Definitions\n\n" + DEFINITIONS, "## Files\n\n" + FILES]
    return "\n\n".join(sections) + "\n"


def terminal_summary(paths: RunDirectory, metrics: dict) -> str:
    parts = [f"Run finished: {paths.root.resolve()}"]
    if metrics["cycles"]:
        parts.append("Distillation cycles (held-out):\n" + cycles_table(metrics["cycles"]))
    if metrics["transfer"]:
        parts.append("Final SAEs (held-out):\n" + finals_table(metrics["transfer"]))
    if metrics.get("figure3"):
        parts.append(metrics["figure3"])
    if metrics.get("consistency"):
        parts.append("Feature consistency across sparsities: " + consistency_outcome(metrics["consistency"], metrics["transfer"]))
    parts.append(f"Tables, figures and definitions: {paths.summary}")
    if (paths.browser / BROWSER_INDEX).exists():
        parts.append(f"Feature browser (offline): {paths.browser / BROWSER_INDEX}")
    return "\n\n".join(parts)


def write_report(config: DistillConfig, paths: RunDirectory) -> str:
    """metrics.json, the figures and SUMMARY.md; returns the terminal summary."""
    runs = final_runs(config)
    metrics = collect_metrics(paths, runs)
    core_sizes = {m["core_size"] for m in metrics["transfer"].values() if m["core"] == "distilled"}
    metrics["consistency"] = consistency_across_sparsities(paths, runs, core_sizes.pop()) if core_sizes else []
    metrics["figure3"] = figure3_outcome(paths, config, metrics["transfer"])
    write_json(paths.metrics, metrics)
    draw_figures(config, paths, metrics, metrics["consistency"])
    build_browser(paths)
    write_text(paths.summary, summary_markdown(config, paths, metrics, read_json(paths.harvest)))
    return terminal_summary(paths, metrics)
