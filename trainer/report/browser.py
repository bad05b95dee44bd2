"""The offline feature browser: ``browser/`` in the run folder (and in the run repo on the Hub), a
static page that opens from ``file://`` with no network (no CDN; its CSS and JavaScript are inline
in ``index.html``; the folder is flat, so the Hub folder is a plain copy).

Every latent of every final SAE, searchable by index and by top token, from the per-latent evidence
saved beside each SAE (``modeling_dmsae.evidence``); and for every latent of the distilled core its
lineage (origin cycle, every cycle that selected it, its attribution score and rank there) with its
top contexts in each final SAE that carries it, side by side across k.

Data files are JavaScript (``*.js`` beside ``index.html``, each one call ``DMSAE.add(...)``), loaded
by ``<script>`` tags: Chromium refuses ``fetch()`` of local files. ``run.js``: the SAEs, the core's lineage and
the text of every token id; ``contexts.js``: the held-out contexts' token ids (shared by every SAE of
the run); ``SAE.summary.js``: per latent its frequency, mean, max and top tokens, what search reads;
``SAE.NNN.js``: the details of SHARD_SIZE latents (histogram, logit effect, examples with their
windows), loaded when a latent of the shard is shown. At K = 65,536 a shard is the details of 256
latents, so a page opens with the index and one summary per SAE shown.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_dmsae import DMSAEConfig
from modeling_dmsae.evidence import EVIDENCE_JSON, EVIDENCE_TENSORS
from trainer.run.files import atomic_folder, read_json, write_text
from trainer.run.kinds import KINDS
from trainer.run.layout import BROWSER_INDEX, CORE_JSON, METRICS_JSON, RunDirectory, cycle_number
from trainer.run.metrics_file import SAEMetrics

SHARD_SIZE = 256
SUMMARY_TOKENS = 3  # top tokens per latent in the summary (what search matches)


def _rounded(value: float) -> float | None:
    """3 significant digits; None (JSON null) for NaN: a position that never reached the SAE."""
    if math.isnan(value):
        return None
    return float(f"{value:.3g}")


def _script(call: str, payload) -> str:
    return f"DMSAE.add({json.dumps(call)}, {json.dumps(payload, separators=(',', ':'), allow_nan=False)});\n"


def core_lineage(paths: RunDirectory) -> list[dict]:
    """Every latent of the distilled core C*, in C*'s order: its lineage key [origin cycle, origin
    index], and each cycle whose core C(t) selected it, with the latent's index in cycle t's SAE,
    its rank in C(t) and its attribution score there."""
    distilled = read_json(paths.distilled_core / CORE_JSON)
    selections: dict[tuple[int, int], list[dict]] = {}
    for folder in paths.cycles():
        core = read_json(folder / CORE_JSON)
        for rank, (key, index, score) in enumerate(zip(core["lineage"], core["selected"], core["scores"])):
            selections.setdefault(tuple(key), []).append({"cycle": cycle_number(folder), "index": index, "rank": rank, "score": score})
    return [
        {"key": list(key), "origin_cycle": key[0], "selections": selections.get(tuple(key), [])}
        for key in distilled["lineage"]
    ]


def _final_saes(paths: RunDirectory) -> list[tuple[Path, SAEMetrics, DMSAEConfig]]:
    """The final SAEs that have evidence, ordered by kind (the registry's order), k and seed."""
    finals = []
    for folder in paths.transfers():
        if (folder / EVIDENCE_TENSORS).exists():
            finals.append((folder, SAEMetrics.read(folder / METRICS_JSON), DMSAEConfig.from_pretrained(folder)))
    return sorted(finals, key=lambda item: (list(KINDS).index(item[1].kind), item[2].k, item[1].seed))


def _summary(evidence: dict[str, torch.Tensor]) -> list[list]:
    """Per latent: [frequency, mean, max, top activating token ids, top promoted token ids]."""
    rows = []
    contexts, positions = evidence["example_context"], evidence["example_position"]
    tokens = evidence["context_tokens"]
    for j in range(contexts.shape[0]):
        centres = [int(tokens[c, p]) for c, p in zip(contexts[j].tolist(), positions[j].tolist()) if c >= 0]
        distinct = list(dict.fromkeys(centres))[:SUMMARY_TOKENS]
        rows.append(
            [
                _rounded(float(evidence["firing_frequency"][j])),
                _rounded(float(evidence["mean_activation"][j])),
                _rounded(float(evidence["max_activation"][j])),
                distinct,
                evidence["promoted_tokens"][j, :SUMMARY_TOKENS].tolist(),
            ]
        )
    return rows


def _details(evidence: dict[str, torch.Tensor], j: int) -> dict:
    examples = []
    for e in range(evidence["example_context"].shape[1]):
        context = int(evidence["example_context"][j, e])
        if context >= 0:
            window = [_rounded(v) for v in evidence["window_activations"][j, e].float().tolist()]
            examples.append([e, context, int(evidence["example_position"][j, e]), _rounded(float(evidence["example_activation"][j, e])), window])
    pairs = lambda ids, logits: [[int(i), _rounded(float(v))] for i, v in zip(ids[j], logits[j])]  # noqa: E731
    return {
        "histogram": evidence["histogram"][j].tolist(),
        "promoted": pairs(evidence["promoted_tokens"], evidence["promoted_logits"]),
        "suppressed": pairs(evidence["suppressed_tokens"], evidence["suppressed_logits"]),
        "examples": examples,
    }


def _write_sae(folder: Path, name: str, evidence: dict[str, torch.Tensor]) -> None:
    write_text(folder / f"{name}.summary.js", _script(f"summary:{name}", _summary(evidence)))
    num_latents = evidence["firing_frequency"].numel()
    for shard in range(math.ceil(num_latents / SHARD_SIZE)):
        latents = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, num_latents))
        write_text(folder / f"{name}.{shard:03d}.js", _script(f"shard:{name}:{shard}", [_details(evidence, j) for j in latents]))


def build_browser(paths: RunDirectory) -> Path | None:
    """Write ``browser/`` (index.html and data/) for the run's final SAEs; None when none has evidence."""
    finals = _final_saes(paths)
    if not finals:
        return None
    lineage = core_lineage(paths) if (paths.distilled_core / CORE_JSON).exists() else []
    keys = {tuple(entry["key"]): i for i, entry in enumerate(lineage)}
    token_text: dict[str, str] = {}
    contexts = None
    saes = []
    with atomic_folder(paths.browser) as staging:
        data = staging
        for folder, metrics, config in finals:
            evidence = load_file(folder / EVIDENCE_TENSORS)
            settings = read_json(folder / EVIDENCE_JSON)
            token_text.update(settings["token_text"])
            contexts = evidence["context_tokens"] if contexts is None else contexts
            # Which core latent of the run each of this SAE's core latents is (random cores: none).
            core_latents = {keys[tuple(key)]: j for j, key in enumerate(config.core_lineage) if tuple(key) in keys}
            if not metrics.sae_kind.keeps_distilled_core:
                core_latents = {}
            saes.append(
                {
                    "name": folder.name,
                    "k": config.k,
                    "kind": metrics.kind,
                    "label": metrics.label,
                    "core_size": config.core_size,
                    "num_latents": config.num_latents,
                    "fve": metrics.get("fve"),
                    "l0": metrics.get("l0"),
                    "seed": metrics.seed,
                    "core_latents": core_latents,
                    "quantiles": settings["quantiles"],
                    "top_n": settings["top_n"],
                    "window_before": settings["window"]["before"],
                    "histogram_edges": [_rounded(v) for v in evidence["histogram_edges"].tolist()],
                }
            )
            _write_sae(data, folder.name, evidence)
        write_text(data / "contexts.js", _script("contexts", contexts.tolist()))
        index = {"run": paths.root.resolve().name, "saes": saes, "core": lineage, "shard_size": SHARD_SIZE, "token_text": token_text}
        write_text(data / "run.js", _script("index", index))
        shutil.copyfile(resources.files("trainer.report").joinpath("browser.html"), staging / BROWSER_INDEX)
    return paths.browser / BROWSER_INDEX
