"""The end of a run: every metric in one file, the figures, and SUMMARY.md with the results.

SUMMARY.md answers what a reviewer checks first: which positions reached the SAEs, each cycle's
core and health, each final SAE against the plain Matryoshka baseline at the same k, the
paper's Figure 3 stated in words, the sparsity-fidelity plane (Figure 4's analogue) and feature
consistency across sparsities. The terminal gets the same tables.
"""

from __future__ import annotations

from itertools import combinations
from statistics import fmean
from pathlib import Path
from typing import NamedTuple

import torch

from modeling_dmsae import DMSAEModel
from trainer.config import DistillConfig
from trainer.report.browser import build_browser
from trainer.report.figures import (
    ConsistencyBar,
    CoreCurve,
    MovementCurve,
    SparsityPoint,
    consistency_figure,
    core_lineage_figure,
    coverage_figure,
    dictionary_movement_figure,
    every_core_figure,
    l0_core_figure,
    sparsity_fidelity_figure,
)
from trainer.report.spreads import spread, verdict
from trainer.run.files import read_json, write_text
from trainer.run.kinds import BASELINE, DENSE_CORE, DMSAE, KINDS, MATCHED_NORM, RANDOM_CORE, RANDOM_CORE_FIXED, SAEKind, kind_named
from trainer.run.layout import BROWSER_FOLDER, BROWSER_INDEX, CORE_JSON, METRICS_JSON, RunDirectory, figure_file
from trainer.run.logs import read_curve, read_records
from trainer.run.metrics_file import HIGHER, METRICS, RunMetrics, SAEMetrics
from trainer.run.stages import FinalSAE, final_saes
from trainer.sae.metrics import MATCH_COSINE, chance_max_cosine, decoder_consistency

# Below this margin over random directions, a mean best match says nothing: it moves by a few
# hundredths between unrelated dictionaries.
CHANCE_MARGIN = 0.05
# Above this median cosine to its initialisation, most of a dictionary has not learned anything yet.
UNDERTRAINED_COSINE = 0.8


def batchtopk_l0(metrics: SAEMetrics, variant: str) -> float:
    """The measured L0 of the latents BatchTopK budgets (non-core for a dense core, all otherwise),
    to hold against its target ``k_noncore``."""
    return metrics["l0_noncore"] if variant == DENSE_CORE and metrics["core_size"] > 0 else metrics["l0"]


def collect_metrics(paths: RunDirectory, finals: list[FinalSAE]) -> RunMetrics:
    """Every finished SAE's metrics.json: the cycles', and the final SAEs' of this configuration."""
    metrics = RunMetrics()
    for folder in paths.cycles():
        metrics.cycles[folder.name] = SAEMetrics.read(folder / METRICS_JSON)
    for final in finals:
        folder = paths.transfer(final.name)
        if folder.exists():
            metrics.transfer[final.name] = SAEMetrics.read(folder / METRICS_JSON)
    return metrics


# ---- feature consistency across sparsities --------------------------------------------------


CONSISTENCY_KINDS = (DMSAE, BASELINE, RANDOM_CORE_FIXED)
"""The kinds compared across k: the DMSAEs (dense core), the baselines, whose first |C*| latents
stand in for a core (the start of the most nested prefix, where a Matryoshka SAE keeps its most
general features), and the random core that is the same at every k (how consistent a frozen core
that was not distilled makes a dictionary)."""


def consistency_across_sparsities(paths: RunDirectory, finals: list[FinalSAE], core_size: int) -> list[dict]:
    """Decoder-direction matches for every pair of final SAEs of one kind and seed at different k
    (CONSISTENCY_KINDS)."""
    results = []
    for seed in sorted({final.seed for final in finals}):
        for kind in CONSISTENCY_KINDS:
            members = sorted((f for f in finals if (f.kind, f.seed) == (kind, seed)), key=lambda f: f.k)
            members = [f for f in members if paths.transfer(f.name).exists()]
            models = {f.name: DMSAEModel.from_pretrained(paths.transfer(f.name)) for f in members}
            for a, b in combinations(members, 2):
                match = decoder_consistency(models[a.name], models[b.name], core_size)
                chance = chance_max_cosine(models[b.name])
                results.append({"family": kind.label, "k_a": a.k, "k_b": b.k, "seed": seed, **match, "chance_mean_max_cosine": chance})
    return results


# ---- the Figure-3 outcome ----------------------------------------------------------------------


class CoreUsage(NamedTuple):
    start: float  # mean L0_core over the first tenth of the logged steps
    end: float  # mean L0_core over the last tenth
    held_out: float  # L0_core on held-out tokens, inference threshold


def _core_usage(paths: RunDirectory, final: FinalSAE, metrics: dict[str, SAEMetrics]) -> CoreUsage | None:
    _, curve = read_curve(paths.log(final.stage), "l0_core")
    if not curve or final.name not in metrics:
        return None
    tenth = max(1, len(curve) // 10)
    return CoreUsage(sum(curve[:tenth]) / tenth, sum(curve[-tenth:]) / tenth, metrics[final.name]["l0_core"])


def _core_bias(paths: RunDirectory, final: FinalSAE) -> torch.Tensor:
    """The trained encoder biases of its core latents: in the dense-core variant nothing penalises
    core activity, so a positive bias lets a core latent fire on most tokens."""
    sae = DMSAEModel.from_pretrained(paths.transfer(final.name))
    return sae.b_enc.detach()[: sae.config.core_size]


def _core_biases(paths: RunDirectory, final: FinalSAE) -> str:
    """How many core encoder biases ended positive, and their mean."""
    core = _core_bias(paths, final)
    return f"{int((core > 0).sum())} of {len(core)} positive (mean {float(core.mean()):+.3f})"


def core_usage_table(paths: RunDirectory, transfer: dict[str, SAEMetrics]) -> str | None:
    """Every kind with a frozen core, over its seeds: L0_core over the first and the last tenth of
    training, on held-out tokens as trained and above the inference threshold, and the share of core
    encoder biases that ended positive. None without a trained core."""
    rows = []
    for (kind, factor, k), seeds in kinds_over_seeds(transfer).items():
        if not kind.has_core:
            continue
        finals = [FinalSAE(kind, k, seed, factor) for seed in seeds]
        usage = [_core_usage(paths, final, transfer) for final in finals]
        if None in usage:
            continue
        positive = [float((_core_bias(paths, final) > 0).float().mean()) * 100 for final in finals]
        held_out = [_l0_cell(seeds, key) for key in SEED_L0S[1:]]
        rows.append([
            kind.label_for(factor), str(k), str(len(seeds)), spread(u.start for u in usage).format(1),
            spread(u.end for u in usage).format(1), *held_out, spread(positive).format(0),
        ])  # fmt: skip
    header = ["core", "k", "seeds", "L0 core, first tenth", "L0 core, last tenth", *(f"held-out {c}" for c in _header(SEED_L0S[1:])), "biases > 0 (%)"]
    return markdown_table(header, rows) if rows else None


FIGURE3_CONTROL = RANDOM_CORE
"""The paper's Figure-3 control, against the kind it controls."""


def _seed_pairs(
    paths: RunDirectory, config: DistillConfig, transfer_metrics: dict[str, SAEMetrics]
) -> list[tuple[FinalSAE, FinalSAE, CoreUsage, CoreUsage]]:
    """Per seed with both SAEs finished: the distilled and the random core at the distillation k,
    and their core usage."""
    pairs = []
    for seed in config.transfer.seeds:
        finals = [FinalSAE(kind, config.cycles.k, seed) for kind in (kind_named(FIGURE3_CONTROL.controls), FIGURE3_CONTROL)]
        usage = [_core_usage(paths, final, transfer_metrics) for final in finals]
        if None not in usage:
            pairs.append((*finals, *usage))
    return pairs


def _happened(event: str, negation: str, count: int, n: int) -> str:
    """``fell`` / ``did not fall`` for one seed, ``fell in 2 of 3 seeds`` for several."""
    return (event if count else negation) if n == 1 else f"{event} in {count} of {n} seeds"


def figure3_outcome(paths: RunDirectory, config: DistillConfig, transfer_metrics: dict[str, SAEMetrics]) -> str | None:
    """Figure 3 in words: did the random core's L0_core fall during training, and did the distilled
    core end above it, seed by seed; and their held-out fidelity with its spread over seeds.
    Measured, never tuned for."""
    pairs = _seed_pairs(paths, config, transfer_metrics)
    if not pairs:
        return None
    n, k = len(pairs), config.cycles.k
    distilled_runs, random_runs, distilled, random = zip(*pairs)
    fell = sum(r.end < 0.9 * r.start for r in random)
    above = sum(d.end > r.end for d, r in zip(distilled, random))
    agrees = sum(r.end < 0.9 * r.start and d.end > r.end for d, r in zip(distilled, random))
    start, end = spread(r.start for r in random), spread(r.end for r in random)
    # A random core that never fired early on has no relative change to state.
    change = f"{(end.mean / start.mean - 1) * 100:+.0f}%" + (" on average" if n > 1 else "") if start.mean > 0 else "it did not fire in the first tenth"
    measured = ["fve", "loss_recovered", "l0_core", "l0_core_above_threshold"]
    # metrics.json files written before the thresholded count existed lack it
    measured = [m for m in measured if all(transfer_metrics[run.name].has(m) for run in distilled_runs + random_runs)]
    fidelity = {
        metric: [spread(transfer_metrics[run.name][metric] for run in runs) for runs in (distilled_runs, random_runs)]
        for metric in measured
    }
    thresholded = (
        f"counted only above the inference threshold the non-core latents use, {fidelity['l0_core_above_threshold'][0].format(1)} "
        f"against {fidelity['l0_core_above_threshold'][1].format(1)}. "
        if "l0_core_above_threshold" in fidelity else ""
    )
    c = transfer_metrics[random_runs[0].name]["core_size"]
    norm = config.transfer.random_core_norm
    norms = "of the same norms" if norm == MATCHED_NORM else f"of other norms (--transfer.random_core_norm {norm})"
    outcome = "agrees" if agrees == n else "does not reproduce that" if agrees == 0 else f"agrees in {agrees} of {n} seeds"
    seeds = f"{n} seeds (mean [min, max])" if n > 1 else "one seed: no spread to judge a small difference by"
    return (
        f"At k = {k}, {seeds}. Both cores of {c} latents, frozen encoder rows {norms}, started the same way "
        f"(DMSAEModel.from_core: the decoder unrelated to them); only the {'directions' if norm == MATCHED_NORM else 'directions and norms'} differ. "
        f"The random core's L0_core went from {start.format(1)} (first tenth of training) to {end.format(1)} (last tenth): "
        f"it {_happened('fell', 'did not fall', fell, n)} ({change}). "
        f"The distilled core went from {spread(d.start for d in distilled).format(1)} to {spread(d.end for d in distilled).format(1)} "
        f"and {_happened('ended above the random core', 'ended below the random core', above, n)}. "
        f"On held-out tokens L0_core is {fidelity['l0_core'][0].format(1)} (distilled) against {fidelity['l0_core'][1].format(1)} (random)"
        f"{'; ' + thresholded if thresholded else '. '}"
        f"The paper reports a random core driven toward 0 while a distilled core keeps firing: this run {outcome}. "
        f"Held-out FVE {fidelity['fve'][0].format()} (distilled) against {fidelity['fve'][1].format()} (random), "
        f"{verdict(*fidelity['fve'])}; loss recovered {fidelity['loss_recovered'][0].format()} against "
        f"{fidelity['loss_recovered'][1].format()}, {verdict(*fidelity['loss_recovered'])}. "
        f"Core encoder biases after training (seed {random_runs[0].seed}): random core {_core_biases(paths, random_runs[0])}, "
        f"distilled core {_core_biases(paths, distilled_runs[0])}."
    )


# ---- figures -----------------------------------------------------------------------------------


def core_origins(cores: list[dict]) -> list[list[int]]:
    """Per cycle, the origin cycle of every latent of C(t) (the cycles' core.json, in order): Figure 2's bars."""
    return [[origin for origin, _ in core["lineage"]] for core in cores]


def draw_figures(config: DistillConfig, paths: RunDirectory, metrics: RunMetrics) -> list[Path]:
    figures = []
    cores = [read_json(folder / CORE_JSON) for folder in paths.cycles()]
    if cores:
        figures.append(core_lineage_figure(core_origins(cores), paths.figure("core_lineage")))
        curves = {f"cycle {core['cycle']}": core["coverage_curve"] for core in cores}
        figures.append(coverage_figure(curves, config.cycles.tau, paths.figure("coverage_curve")))
    curves = [
        CoreCurve(final.kind.label, final.seed, *read_curve(paths.log(final.stage), "l0_core"))
        for pair in _seed_pairs(paths, config, metrics.transfer) for final in pair[:2]
    ]  # fmt: skip
    if curves:
        figures.append(l0_core_figure(curves, paths.figure("l0_core")))
    every_core = core_curves(paths, config, metrics.transfer)
    if len({curve.kind for curve in every_core}) > len({curve.kind for curve in curves}):
        figures.append(every_core_figure(every_core, paths.figure("every_core")))
    points = [
        SparsityPoint(m.label, m.k, m["l0"], m["l0_noncore"], m["loss_recovered"], m["fve"])
        for m in metrics.transfer.values()
    ]
    if points:
        figures.append(sparsity_fidelity_figure(points, paths.figure("sparsity_fidelity")))
    if metrics.consistency:
        figures.append(consistency_figure(consistency_bars(metrics.consistency), paths.figure("consistency")))
    movement = movement_curves(paths, metrics.transfer)
    if movement:
        figures.append(dictionary_movement_figure(movement, paths.figure("dictionary_movement")))
    return figures


def core_curves(paths: RunDirectory, config: DistillConfig, transfer: dict[str, SAEMetrics]) -> list[CoreCurve]:
    """L0_core during training of every final SAE with a frozen core at the distillation k (the
    DMSAEs and the Figure-3 controls), labelled by kind and factor."""
    finals = [FinalSAE.from_metrics(m) for m in transfer.values()]
    return [
        CoreCurve(final.label, final.seed, *read_curve(paths.log(final.stage), "l0_core"))
        for final in finals if final.kind.has_core and final.k == config.cycles.k
    ]  # fmt: skip


def movement_curves(paths: RunDirectory, transfer: dict[str, SAEMetrics]) -> list[MovementCurve]:
    """Every trained SAE's logged decoder movement (cycles, then the final SAEs); logs written
    before the trainer logged it are skipped."""
    stages = [(folder.name, "cycle", read_json(folder / "config.json")["k"], 0) for folder in paths.cycles()]
    stages += [
        (final.stage, final.label, final.k, final.seed) for m in transfer.values() for final in [FinalSAE.from_metrics(m)]
    ]
    curves = []
    for stage, label, k, seed in stages:
        records = read_records(paths.log(stage))
        if records and all("decoder_cosine_to_init" in r for r in records):
            curves.append(MovementCurve(label, k, seed, [r["step"] for r in records], [r["decoder_cosine_to_init"] for r in records]))
    return curves


def consistency_bars(consistency: list[dict]) -> list[ConsistencyBar]:
    """One bar per family and k pair, each value's spread over the seeds."""
    pairs: dict[tuple, list[dict]] = {}
    for row in consistency:
        pairs.setdefault((row["family"], row["k_a"], row["k_b"]), []).append(row)
    return [
        ConsistencyBar(
            f"{name.split(' (')[0]} k={k_a} vs {k_b}",
            spread(_fraction(r["core"]) for r in rows), spread(_fraction(r["rest"]) for r in rows),
            spread(r["core"]["mean_max_cosine"] for r in rows), spread(r["rest"]["mean_max_cosine"] for r in rows),
            spread(r["chance_mean_max_cosine"] for r in rows).mean,
        )
        for (name, k_a, k_b), rows in pairs.items()
    ]  # fmt: skip


def _fraction(part: dict) -> float:
    return part["matched"] / part["latents"] if part["latents"] else float("nan")


# ---- tables ------------------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in header[1:]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metric_cell(metrics: SAEMetrics, key: str) -> str:
    """A metric as the report writes it; "" where the SAE has none (an imported cycle 0 has no
    decoder movement, a cycle without a frozen core no carry-over)."""
    value = metrics.get(key)
    return "" if value is None or value != value else METRICS[key].show(value)


def _batchtopk_cell(metrics: SAEMetrics, variant: str) -> str:
    return f"{batchtopk_l0(metrics, variant):.1f} / {metrics['k_noncore']}"


BATCHTOPK_COLUMN = "BatchTopK L0 / target"
CYCLE_COLUMNS = ("fve", "l0_core", BATCHTOPK_COLUMN, "dead_fraction", "loss_recovered", "decoder_cosine_to_init")
FINAL_COLUMNS = ("core_size", "l0_core", "l0_core_above_threshold", BATCHTOPK_COLUMN, "l0", "fve", "dead_fraction", "loss_recovered")
FIDELITY = tuple(metric.key for metric in METRICS.values() if metric.better == HIGHER)
"""The metrics a final SAE is compared with the baseline by (higher is better): FVE, loss recovered."""


def _header(columns: tuple[str, ...]) -> list[str]:
    return [METRICS[key].column if key in METRICS else key for key in columns]


def _cells(metrics: SAEMetrics, columns: tuple[str, ...], variant: str) -> list[str]:
    return [_batchtopk_cell(metrics, variant) if key == BATCHTOPK_COLUMN else metric_cell(metrics, key) for key in columns]


def cycles_table(cycles: dict[str, SAEMetrics], variant: str) -> str:
    """One row per cycle (``variant``: the cycles' masking, --cycles.variant)."""
    identity = ("core_size", "selected_core_size", "carry_over")
    rows = [[name, *(metric_cell(m, key) for key in identity), *_cells(m, CYCLE_COLUMNS, variant)] for name, m in cycles.items()]
    return markdown_table(["cycle", *_header(identity), *_header(CYCLE_COLUMNS)], rows)


def _order(metrics: SAEMetrics) -> tuple[int, float, int, int]:
    """The report's order of final SAEs: by kind (the registry's order), factor, k and seed."""
    return list(KINDS).index(metrics.kind), metrics.factor or 0.0, metrics.k, metrics.seed


def finals_table(transfer: dict[str, SAEMetrics]) -> str:
    """One row per final SAE, by kind, k and seed; each against the baseline at its k and seed."""
    baselines = {(m.k, m.seed): m for m in transfer.values() if m.sae_kind is BASELINE}
    rows = []
    for name, m in sorted(transfer.items(), key=lambda item: _order(item[1])):
        base = baselines.get((m.k, m.seed)) if m.sae_kind is not BASELINE else None
        versus = " / ".join(f"{m[key] - base[key]:+.3f}" for key in FIDELITY) if base else ""
        cells = _cells(m, FINAL_COLUMNS, m.sae_kind.variant)
        rows.append([name, m.label, str(m.k), *cells, versus, metric_cell(m, "decoder_cosine_to_init")])
    versus_header = "vs baseline: " + " / ".join(METRICS[key].column for key in FIDELITY)
    return markdown_table(["SAE", "family", "k", *_header(FINAL_COLUMNS), versus_header, METRICS["decoder_cosine_to_init"].column], rows)


def kinds_over_seeds(transfer: dict[str, SAEMetrics]) -> dict[tuple[SAEKind, float | None, int], dict[int, SAEMetrics]]:
    """The final SAEs by (kind, factor, k), each one's metrics by seed, in the report's order."""
    kinds: dict[tuple[SAEKind, float | None, int], dict[int, SAEMetrics]] = {}
    for m in sorted(transfer.values(), key=_order):
        kinds.setdefault((m.sae_kind, m.factor, m.k), {})[m.seed] = m
    return kinds


SEED_L0S = ("l0", "l0_core", "l0_core_above_threshold")
CORE_USAGE_NOTE = (
    "Every frozen core of the run (mean [min, max] over seeds): how many of its latents fired per token "
    "early and late in training, on held-out tokens (counted as trained, and only above the inference "
    "threshold θ the non-core latents use), and the share of its encoder biases that ended positive."
)


def _l0_cell(seeds: dict[int, SAEMetrics], key: str) -> str:
    """An L0 over seeds (mean [min, max]); empty where a seed's metrics.json predates the metric."""
    return spread(m[key] for m in seeds.values()).format(1) if all(m.has(key) for m in seeds.values()) else ""


def seeds_table(transfer: dict[str, SAEMetrics]) -> str:
    """Each kind of final SAE over its seeds (mean, and min to max), against the baseline at its k:
    the difference paired by seed, and whether the two kinds' ranges over seeds are apart."""
    kinds = kinds_over_seeds(transfer)
    rows = []
    for (kind, factor, k), seeds in kinds.items():
        base = kinds.get((BASELINE, None, k), {}) if kind is not BASELINE else {}
        row = [kind.label_for(factor), str(k), str(len(seeds))]
        row += [_l0_cell(seeds, key) for key in SEED_L0S]
        for metric in FIDELITY:
            own = spread(m[metric] for m in seeds.values())
            paired = [m[metric] - base[s][metric] for s, m in seeds.items() if s in base]
            versus = f"{spread(paired).format(signed=True)}, {verdict(own, spread(m[metric] for m in base.values()))}" if paired else ""
            row += [own.format(), versus]
        row += [spread(m["dead_fraction"] * 100 for m in seeds.values()).format(1)]
        moved = all(m.has("decoder_cosine_to_init") for m in seeds.values())
        row += [spread(m["decoder_cosine_to_init"] for m in seeds.values()).format(2) if moved else ""]
        rows.append(row)
    fidelity = [name for key in FIDELITY for name in (METRICS[key].column, f"{METRICS[key].column} vs baseline (paired by seed)")]
    header = ["family", "k", "seeds", *_header(SEED_L0S), *fidelity, "dead %", METRICS["decoder_cosine_to_init"].column]
    return markdown_table(header, rows)


def several_seeds(transfer: dict[str, SAEMetrics]) -> bool:
    return len({m.seed for m in transfer.values()}) > 1


def consistency_table(consistency: list[dict]) -> str:
    rows = [
        [
            row["family"] + (f", seed {row['seed']}" if "seed" in row else ""), f"{row['k_a']} vs {row['k_b']}",
            f"{row['core']['matched']} / {row['core']['latents']}", f"{row['core']['mean_max_cosine']:.3f}",
            f"{row['rest']['matched']} / {row['rest']['latents']}", f"{row['rest']['mean_max_cosine']:.3f}",
            f"{row['chance_mean_max_cosine']:.3f}",
        ]
        for row in consistency
    ]  # fmt: skip
    header = ["family", "k pair", "core matched", "core mean max-cos", "rest matched", "rest mean max-cos", "random directions"]
    return markdown_table(header, rows)


def consistency_outcome(consistency: list[dict], transfer: dict[str, SAEMetrics]) -> str:
    """What the consistency table can say, in words: the core's agreement across k for each family,
    whether the other latents' matches beat random directions, and how far training moved the
    decoders (a dictionary still at its initialisation has nothing to be consistent about)."""
    by_family: dict[str, dict[int, list[float]]] = {}
    for row in consistency:
        by_family.setdefault(row["family"], {}).setdefault(row["seed"], []).append(row["core"]["mean_max_cosine"])
    core = {name: spread(fmean(values) for values in seeds.values()) for name, seeds in by_family.items()}
    shown = "; ".join(f"{name} {value.format()}" for name, value in core.items())
    sentences = [
        f"Mean best match of the first {consistency[0]['core']['latents']} latents (the core), averaged over the k pairs"
        + (f" (over {next(iter(core.values())).n} seeds: mean [min, max])" if next(iter(core.values())).n > 1 else "")
        + f": {shown}."
    ]
    (first, dmsae), *others = core.items()
    if first == DMSAE.label:
        sentences += [f"DMSAE against {'baseline' if name == BASELINE.label else name}: {verdict(dmsae, value)}." for name, value in others]
    margins = [row["rest"]["mean_max_cosine"] - row["chance_mean_max_cosine"] for row in consistency]
    sentences.append(
        f"Outside the core, the mean best match exceeds what random directions reach by {min(margins):+.3f} to {max(margins):+.3f}"
        + (" (no better than chance: no features measurably shared across k)." if max(margins) < CHANCE_MARGIN else ".")
    )
    moved = [m["decoder_cosine_to_init"] for m in transfer.values() if m.has("decoder_cosine_to_init")]
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


FILES_TEMPLATE = """| path | what it is |
|---|---|
| `cycles/cycle-NNN/` | cycle t's SAE (`AutoModel.from_pretrained`), `core.json` (C(t): latent indices by descending attribution, scores, lineage `[origin_cycle, origin_index]`, coverage curve), `core_directions.safetensors` (the next cycle's frozen core), `metrics.json` |
| `distilled_core/` | C* = C(T) ∩ C(T-1) (`core.json`, `core_directions.safetensors`): the transfer stage's input (`--transfer.core`) |
{kinds}
| `metrics.json` | every metric of every SAE, and feature consistency across sparsities |
| `harvest.json` | which positions reached the SAEs and why others did not; the activation-norm profile |
| `figures/` | the figures above |
| `browser/` | the offline feature browser (`browser/index.html`, opens from disk with no network): every latent of every final SAE, and the distilled core's lineage |
| `*/firing_frequencies.safetensors` | beside every SAE: each latent's firing frequency on the held-out tokens |
| `transfer/*/latent_evidence.*` | beside every final SAE: per latent its mean and max activation, histogram, top and typical held-out contexts, logit effect (format: `modeling_dmsae/evidence.py`, read by `modeling_dmsae.LatentEvidence.from_folder`) |
| `logs/STAGE.jsonl` | training curves (loss, L0 core / non-core, dead fraction, BatchTopK's cut) every `run.log_every` steps; `logs/dmsae/`: the same in the tracker's format (tensorboard events by default) |
| `hub/` | the exact folders pushed to the Hub, with their model cards |
| `cache/` | harvested activations and the (x, g) attribution sample (reused by every cycle and by a resumed run) |
| `checkpoints/` | training checkpoints of unfinished stages (`--run.resume true` continues from them) |
| `timings.json` | wall time per kind of work |"""
FILES = FILES_TEMPLATE.replace("{kinds}", "\n".join(
    f"| `transfer/{kind.folder_pattern}/` | {kind.label_for()} at sparsity k (seed s > 0 adds `-seed-s`); frozen core: "
    f"{kind.core_origin_for()}; with `metrics.json` |" for kind in KINDS.values()
))  # fmt: skip

DEFINITIONS = f"""All metrics on held-out tokens (never trained on), in inference mode: the calibrated threshold,
one token at a time, as users run the SAEs. FVE = 1 - SSE / total variance around the mean; L0
counts active latents per token (core + non-core = global, Eq. 9); "L0 core > θ" counts only the core
latents above the inference threshold θ the non-core latents use (a dense core is ReLU only, so its
L0 core counts every positive one); "BatchTopK L0 / target" holds
the latents BatchTopK budgets (non-core for a dense core, all otherwise) against k_noncore (Eq. 4);
dead = fires on none of the held-out tokens; loss recovered = (CE_zero - CE_spliced) / (CE_zero -
CE_clean), with the SAE spliced in (or zeros) at the kept positions only; carry-over = the fraction
of a cycle's frozen core it selects again; dec. cos to init = the median cosine between a trainable
decoder row after training and where it started (near 1: the dictionary is mostly still random).
Consistency: a latent is matched when another SAE has a decoder direction with cosine >= {MATCH_COSINE};
"random directions" is the mean best cosine 4,096 random unit vectors reach against the same decoder,
the level a mean max-cos must beat to mean anything."""


SEEDS_NOTE = (
    "Each kind of SAE over the run's transfer seeds (`transfer.seeds`): mean [smallest, largest]. A difference from the "
    "baseline is paired by seed (the two SAEs share the transfer seed, not its draws: each one's initialisation and data "
    "order come from the seed and its own name); it *exceeds the spread* when the two kinds' min-to-max ranges do not "
    "overlap. The cycles, and so C*, are the same for every seed."
)

BROWSER_LINK = (
    f"**Feature browser**: [{BROWSER_FOLDER}/{BROWSER_INDEX}]({BROWSER_FOLDER}/{BROWSER_INDEX}), offline: every latent of every "
    "final SAE (top and typical held-out contexts, logit effect), and each core latent's lineage across cycles and k."
)


def summary_markdown(config: DistillConfig, paths: RunDirectory, metrics: RunMetrics, harvest: dict) -> str:
    sections = [
        "# DMSAE distillation run",
        f"`{paths.root}`; configuration `run_config.yaml` (resume with `--config run_config.yaml --run.resume true`).",
        *([BROWSER_LINK] if (paths.browser / BROWSER_INDEX).exists() else []),
        "## Positions that reached the SAEs\n\n" + positions_section(harvest),
    ]
    if metrics.cycles:
        sections.append("## Distillation cycles\n\n" + cycles_table(metrics.cycles, config.cycles.variant))
        sections.append(f"![Figure 2]({figure_file('core_lineage')})\n\n![coverage]({figure_file('coverage_curve')})")
    if metrics.transfer:
        sections.append("## Final SAEs against the Matryoshka baseline\n\n" + finals_table(metrics.transfer))
        if several_seeds(metrics.transfer):
            sections.append("### Over seeds\n\n" + SEEDS_NOTE + "\n\n" + seeds_table(metrics.transfer))
        sections.append(f"![Figure 4 analogue]({figure_file('sparsity_fidelity')})")
        if paths.figure("dictionary_movement").exists():
            sections.append(f"How far training moved each dictionary:\n\n![dictionary movement]({figure_file('dictionary_movement')})")
    if metrics.figure3:
        sections.append("## Figure 3: distilled against random core\n\n" + metrics.figure3)
        sections.append(f"![Figure 3]({figure_file('l0_core')})")
        usage = core_usage_table(paths, metrics.transfer)
        if usage is not None:
            sections.append(CORE_USAGE_NOTE + "\n\n" + usage)
        if paths.figure("every_core").exists():
            sections.append(f"![every core]({figure_file('every_core')})")
    if metrics.consistency:
        sections.append("## Feature consistency across sparsities\n\n" + consistency_table(metrics.consistency))
        sections.append(consistency_outcome(metrics.consistency, metrics.transfer))
        sections.append(f"![consistency]({figure_file('consistency')})")
    sections += ["## Definitions\n\n" + DEFINITIONS, "## Files\n\n" + FILES]
    return "\n\n".join(sections) + "\n"


def terminal_summary(config: DistillConfig, paths: RunDirectory, metrics: RunMetrics) -> str:
    parts = [f"Run finished: {paths.root.resolve()}"]
    if metrics.cycles:
        parts.append("Distillation cycles (held-out):\n" + cycles_table(metrics.cycles, config.cycles.variant))
    if metrics.transfer:
        parts.append("Final SAEs (held-out):\n" + finals_table(metrics.transfer))
        if several_seeds(metrics.transfer):
            parts.append("Over seeds (mean [min, max]):\n" + seeds_table(metrics.transfer))
    if metrics.figure3:
        parts.append(metrics.figure3)
    if metrics.consistency:
        parts.append("Feature consistency across sparsities: " + consistency_outcome(metrics.consistency, metrics.transfer))
    parts.append(f"Tables, figures and definitions: {paths.summary}")
    if (paths.browser / BROWSER_INDEX).exists():
        parts.append(f"Feature browser (offline): {paths.browser / BROWSER_INDEX}")
    return "\n\n".join(parts)


def write_report(config: DistillConfig, paths: RunDirectory) -> str:
    """metrics.json, the figures and SUMMARY.md; returns the terminal summary."""
    finals = final_saes(config)
    metrics = collect_metrics(paths, finals)
    core_sizes = {m["core_size"] for m in metrics.transfer.values() if m.sae_kind.keeps_distilled_core}
    metrics.consistency = consistency_across_sparsities(paths, finals, core_sizes.pop()) if core_sizes else []
    metrics.figure3 = figure3_outcome(paths, config, metrics.transfer)
    metrics.write(paths.metrics)
    draw_figures(config, paths, metrics)
    build_browser(paths)
    write_text(paths.summary, summary_markdown(config, paths, metrics, read_json(paths.harvest)))
    return terminal_summary(config, paths, metrics)
