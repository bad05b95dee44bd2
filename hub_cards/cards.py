"""Model cards for a DMSAE run, rendered with huggingface_hub's ``ModelCard`` / ``ModelCardData``.

Two templates (``hub_cards/templates``):

- ``cycle_core.md``: one distillation cycle - the SAE trained in cycle t and the core C(t) it
  selected. The run repo's root README is the same card for the distilled core
  C* = C(T) ∩ C(T-1), with the figures of the whole run.
- ``final_sae.md``: one transfer-stage SAE (its own repo, loadable with ``AutoModel``).

Cards are deterministic functions of the run-dir folder they describe (no dates, no host names
beyond the Hub endpoint), so rebuilding them never turns an already-pushed folder into a new
commit. Figures are linked by their ``resolve/main`` URL in the run repo, where ``publish.py``
pushes them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants

from modeling_dmsae import DMSAEConfig
from modeling_dmsae.evidence import EVIDENCE_JSON, EVIDENCE_TENSORS
from trainer.config import DISTILLED_TAG
from trainer.run.files import read_json
from trainer.run.layout import (
    BROWSER_FOLDER,
    BROWSER_INDEX,
    CORE_JSON,
    DISTILLED_FOLDER,
    FIRING_FREQUENCIES,
    METRICS_JSON,
    RunDirectory,
    figure_file,
)
from trainer.run.metrics_file import METRICS, SAEMetrics, is_number

PAPER_TITLE = "Attribution-Guided Distillation of Matryoshka Sparse Autoencoders"
PAPER_AUTHORS = "Martin-Linares & Ling"
LINEAGE_ROWS = 16  # core latents listed one by one in a card; the full list is in core.json

RUN_FIGURES = {  # name: (path in the run folder and the run repo, caption)
    name: (figure_file(name), caption)
    for name, caption in {
        "core_lineage": "Origin cycle of every core latent, per cycle (paper Figure 2)",
        "coverage_curve": "Cumulative attribution coverage of the sorted candidate pool",
        "l0_core": "L0 of the core during training: distilled vs random core (paper Figure 3)",
        "dictionary_movement": "How far training moved each dictionary from its initialisation",
    }.items()
}


# A Hub repo id, as the Hub's metadata validation accepts it: ``name`` or ``org/name``.
HUB_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
# Local files the trainer reads as a dataset (trainer.harvest.text_corpus.LOCAL_BUILDERS).
LOCAL_DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


class CardDataset(NamedTuple):
    """The text the activations came from, as a card names it."""

    type: str
    """The model-index dataset type: the Hub id, or a descriptive type for data that has none."""
    name: str
    """Human-readable name (model-index and the card body)."""
    hub_id: str | None
    """Listed in the card's ``datasets`` metadata, which takes Hub ids only."""


EMBEDDED_CORPUS = CardDataset(
    type="python-documentation-and-stdlib-source",
    name="Python documentation (pydoc_data.topics) and standard-library source, dmsae's embedded offline corpus",
    hub_id=None,
)


def card_dataset(dataset: str) -> CardDataset:
    """``data.dataset`` of a run as a card names it: empty is the embedded corpus, a local file or
    folder is named by its path, anything else is a Hub dataset id."""
    if not dataset:
        return EMBEDDED_CORPUS
    local = dataset.startswith((".", "/", "~")) or any(c in dataset for c in "*?") or dataset.endswith(LOCAL_DATA_SUFFIXES)
    if local or Path(dataset).exists() or not HUB_REPO_ID.fullmatch(dataset):
        return CardDataset(type="local-files", name=f"local files {Path(dataset).name}", hub_id=None)
    return CardDataset(type=dataset, name=dataset, hub_id=dataset)


def hub_model_id(model_id: str) -> str | None:
    """``model_id`` when it names a Hub model (what card metadata's ``base_model`` takes), else None."""
    return model_id if HUB_REPO_ID.fullmatch(model_id) and not Path(model_id).exists() else None


@dataclass
class CardSettings:
    """What a card needs to know beyond the run-dir folder it describes."""

    run_repo_id: str
    """The run repo (``ORG/NAME``) holding every cycle, the distilled core and the figures."""
    license: str = "apache-2.0"
    """License of the weights (a Hub license identifier)."""
    datasets: list[CardDataset] = field(default_factory=lambda: [EMBEDDED_CORPUS])
    """Datasets the activations were drawn from (card metadata and model-index: the first)."""
    endpoint: str | None = None
    """Hub URL used in figure links; default: huggingface_hub's endpoint (HF_ENDPOINT)."""

    def repo_url(self, repo_id: str) -> str:
        return f"{(self.endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}"

    def figure_url(self, relative_path: str) -> str:
        return f"{self.repo_url(self.run_repo_id)}/resolve/main/{relative_path}"


def cycle_core_card(cycle_dir: Path, settings: CardSettings, *, revision: str, subfolder: str) -> ModelCard:
    """Card of one cycle: the SAE in ``cycle_dir`` and the core C(t) in its ``core.json``.

    ``revision`` (the cycle's tag) and ``subfolder`` are where the files live in the run repo.
    """
    config = DMSAEConfig.from_pretrained(cycle_dir)
    core = read_json(cycle_dir / CORE_JSON)
    metrics = SAEMetrics.read(cycle_dir / METRICS_JSON)
    return _render_core_card(
        config, core, metrics, settings, revision=revision, subfolder=subfolder, distilled=False,
        figures=["core_lineage", "coverage_curve"],
    )


def distilled_core_card(paths: RunDirectory, last_cycle_dir: Path, settings: CardSettings, *, subfolder: str) -> ModelCard:
    """The run repo's root card: the distilled core C* = C(T) ∩ C(T-1) (``distilled_core/``),
    next to the SAE of the last cycle T it was selected from, with the run's figures and a
    table of every cycle."""
    config = DMSAEConfig.from_pretrained(last_cycle_dir)
    core = read_json(paths.distilled_core / CORE_JSON)
    metrics = SAEMetrics.read(last_cycle_dir / METRICS_JSON)
    cycles = [
        {"cycle": read_json(d / CORE_JSON)["cycle"], **SAEMetrics.read(d / METRICS_JSON).values}
        for d in paths.cycles()
    ]
    return _render_core_card(
        config, core, metrics, settings, revision=DISTILLED_TAG, subfolder=subfolder, distilled=True,
        figures=[name for name, (path, _) in RUN_FIGURES.items() if (paths.root / path).exists()], cycles=cycles,
    )


def final_sae_card(sae_dir: Path, settings: CardSettings, *, repo_id: str) -> ModelCard:
    """Card of a transfer-stage SAE that lives at the root of its own repo ``repo_id``; its kind
    (metrics.json) says where its frozen core comes from."""
    config = DMSAEConfig.from_pretrained(sae_dir)
    metrics = SAEMetrics.read(sae_dir / METRICS_JSON)
    card_data = _card_data(config, metrics, settings, model_name=repo_id.split("/")[-1], tags=["transfer-stage"])
    return ModelCard.from_template(
        card_data,
        template_str=_template("final_sae.md"),
        repo_id=repo_id,
        core_name=metrics.sae_kind.core_origin_for(metrics.factor),
        seed=metrics.seed,
        **_common_fields(config, metrics, settings),
        core_origins=_origin_counts([origin[0] for origin in config.core_lineage]),
        lineage_rows=[
            {"rank": rank, "index": rank, "origin_cycle": origin[0], "origin_index": origin[1], "score": None}
            for rank, origin in enumerate(config.core_lineage[:LINEAGE_ROWS])
        ],
        figures=_figures(settings, ["l0_core", "core_lineage"]),
        evidence_section=_evidence_section(metrics, settings, per_latent=True),
    )


def _render_core_card(
    config: DMSAEConfig,
    core: dict,
    metrics: SAEMetrics,
    settings: CardSettings,
    *,
    revision: str,
    subfolder: str,
    distilled: bool,
    figures: list[str],
    cycles: list[dict] | None = None,
) -> ModelCard:
    cycle = core["cycle"]
    name = "distilled-core" if distilled else f"cycle-{cycle}"
    card_data = _card_data(
        config, metrics, settings, model_name=f"{settings.run_repo_id.split('/')[-1]}-{name}",
        tags=["distillation-cycle", name],
    )
    lineage = core["lineage"]
    scores = core.get("scores") or [None] * len(lineage)
    return ModelCard.from_template(
        card_data,
        template_str=_template("cycle_core.md"),
        repo_id=settings.run_repo_id,
        revision=revision,
        subfolder=subfolder,
        core_folder=DISTILLED_FOLDER if distilled else subfolder,
        distilled=distilled,
        cycle=cycle,
        selected_size=len(core["selected"]),
        tau=core.get("tau"),
        q=core.get("q"),
        candidate_pool_size=core.get("candidate_pool_size"),
        core_origins=_origin_counts([origin[0] for origin in lineage]),
        lineage_rows=[
            {"rank": rank, "index": index, "origin_cycle": origin[0], "origin_index": origin[1], "score": score}
            for rank, (index, origin, score) in enumerate(zip(core["selected"], lineage, scores))
        ][:LINEAGE_ROWS],
        cycles=cycles or [],
        **_common_fields(config, metrics, settings),
        figures=_figures(settings, figures),
        evidence_section=_evidence_section(metrics, settings, per_latent=False),
    )


def _card_data(config: DMSAEConfig, metrics: SAEMetrics, settings: CardSettings, *, model_name: str, tags: list[str]) -> ModelCardData:
    dataset = settings.datasets[0]
    eval_results = [
        EvalResult(
            task_type="feature-extraction",
            task_name="Sparse autoencoder reconstruction",
            dataset_type=dataset.type,
            dataset_name=dataset.name,
            metric_type=metric.key,
            metric_name=metric.label,
            metric_value=float(metrics[metric.key]),
        )
        for metric in METRICS.values()
        if metric.measured and is_number(metrics.get(metric.key))
    ]
    return ModelCardData(
        library_name="transformers",
        base_model=hub_model_id(config.base_model_id),
        datasets=[d.hub_id for d in settings.datasets if d.hub_id] or None,
        license=settings.license,
        tags=["dmsae", "sparse-autoencoder", "matryoshka", "interpretability", "custom_code", config.variant.replace("_", "-"), *tags],
        model_name=model_name,
        eval_results=eval_results or None,
    )


def _common_fields(config: DMSAEConfig, metrics: SAEMetrics, settings: CardSettings) -> dict[str, Any]:
    return {
        "paper_title": PAPER_TITLE,
        "paper_authors": PAPER_AUTHORS,
        "base_model": config.base_model_id,
        "base_model_file": config.base_model_file,
        "dataset_name": settings.datasets[0].name,
        "hook_module": config.hook_module,
        "hook_name": config.hook_name,
        "hook_layer": config.hook_layer,
        "variant": config.variant,
        "num_latents": config.num_latents,
        "core_size": config.core_size,
        "k": config.k,
        "k_noncore": config.k_noncore,
        "group_sizes": config.group_sizes,
        "d_in": config.d_in,
        "sae_cycle": config.cycle,
        "metrics": [
            {"key": key, "name": METRICS[key].label, "value": _format_number(value)}
            for key, value in metrics.values.items()
            if is_number(value)
        ],
        "run_repo_id": settings.run_repo_id,
        "run_repo_url": settings.repo_url(settings.run_repo_id),
    }


def _evidence_section(metrics: SAEMetrics, settings: CardSettings, per_latent: bool) -> str:
    """What the folder holds of its latents' behaviour (a final SAE: the whole per-latent evidence;
    a cycle: the firing frequencies), and how to open the run's feature browser."""
    tokens = f"{metrics['eval_tokens']:,} " if is_number(metrics.get("eval_tokens")) else ""
    frequencies = f"`{FIRING_FREQUENCIES}` holds every latent's firing frequency on the {tokens}held-out tokens of the run."
    evidence = (
        f" `{EVIDENCE_TENSORS}` and `{EVIDENCE_JSON}`, beside the weights, hold for every latent, on the same tokens: "
        "its mean and max activation, an activation histogram, its top and typical held-out contexts with its activation "
        "on every token of each window, and the tokens its decoder direction promotes and suppresses through the base "
        "model's final norm and unembedding (the format is described in `modeling_dmsae/evidence.py`, which ships beside the weights; `modeling_dmsae.LatentEvidence.from_folder` reads it)."
    )
    browser = (
        f"\n\nThe run's offline feature browser is the folder [`{BROWSER_FOLDER}/`]"
        f"({settings.repo_url(settings.run_repo_id)}/tree/main/{BROWSER_FOLDER}) of the run repo: download it with "
        f"`hf download {settings.run_repo_id} --include \"{BROWSER_FOLDER}/*\" --local-dir .` and open "
        f"`{BROWSER_FOLDER}/{BROWSER_INDEX}` (no network needed). It shows every latent of every final SAE, and each "
        "core latent's lineage with its contexts in every final SAE side by side."
    )
    return frequencies + (evidence if per_latent else "") + browser


def _figures(settings: CardSettings, names: list[str]) -> list[dict[str, str]]:
    return [{"caption": RUN_FIGURES[name][1], "url": settings.figure_url(RUN_FIGURES[name][0])} for name in names]


def _origin_counts(origin_cycles: list[int]) -> list[dict[str, int]]:
    counts = Counter(origin_cycles)
    return [{"origin_cycle": cycle, "count": counts[cycle]} for cycle in sorted(counts)]


def _format_number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _template(name: str) -> str:
    return resources.files("hub_cards").joinpath("templates", name).read_text(encoding="utf-8")
