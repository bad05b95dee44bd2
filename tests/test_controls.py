"""The Figure-3 control differs from what it controls in exactly one thing: the frozen core's
directions. Same initialisation path (DMSAEModel.from_core), same shapes, same norms, same seed
policy; the baseline takes the same path with no core. So do the other controls, each in its
one thing: the random core's norms, the distilled core's scale, the random core's scale, the
sparse-core variant, the same random core at every k; and the settings that ask for them train
exactly the SAEs they name."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import set_seed
from test_distill import finished_run, tiny_setup  # noqa: F401 (fixtures)

from trainer.config import parse_config
from trainer.errors import ConfigError
from trainer.run.kinds import (
    BASELINE,
    DMSAE,
    DMSAE_SPARSE_CORE,
    RANDOM_CORE,
    RANDOM_CORE_FIXED,
    RANDOM_CORE_NORMS,
    RANDOM_CORE_SCALED,
    RANDOM_CORE_SPARSE,
    RESCALED_CORE,
    Core,
    SAEKind,
)
from trainer.pipeline.transfer import initial_model
from trainer.run.stages import FinalSAE, core_seed, final_saes

D, K, C = 64, 512, 24


def distilled_core() -> Core:
    """Trained encoder rows are not unit vectors: norms between 1 and 1.4, as in the default run."""
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(C, D, generator=generator), dim=-1)
    return Core(directions * (1 + 0.4 * torch.rand(C, 1, generator=generator)), [[3, j] for j in range(C)])


def start(kind: SAEKind, core: Core, *settings: str, k: int = 16, seed: int = 0, factor: float | None = None):
    config = parse_config(["--dictionary.num_latents", str(K), "--cycles.k", "16", *settings])
    set_seed(0)  # what the stage's name seeds in a run: here the same for both, to compare them tensor by tensor
    return initial_model(config, FinalSAE(kind, k, seed, factor), core, D, normalization_factor=2.0)


def differences(model, reference) -> tuple[set[str], set[str]]:
    """The tensors and the configuration fields in which ``model`` differs from ``reference``."""
    tensors = {name for name, tensor in reference.state_dict().items() if not torch.equal(model.state_dict()[name], tensor)}
    fields, reference_fields = model.config.to_dict(), reference.config.to_dict()
    return tensors, {name for name in reference_fields if fields[name] != reference_fields[name]}


def directions(rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows, dim=-1)


def decoder_to_frozen_cosines(model) -> torch.Tensor:
    c = model.config.core_size
    return torch.nn.functional.cosine_similarity(model.W_dec.detach()[:c], model.core_encoder, dim=-1)


def test_the_random_core_differs_from_the_distilled_one_only_in_its_directions():
    core = distilled_core()
    distilled, random = start(DMSAE, core), start(RANDOM_CORE, core)
    assert torch.equal(distilled.core_encoder, core.directions)
    assert not torch.allclose(random.core_encoder, core.directions)
    torch.testing.assert_close(random.core_encoder.norm(dim=-1), core.directions.norm(dim=-1))
    overlap = torch.nn.functional.cosine_similarity(random.core_encoder, core.directions, dim=-1).abs()
    assert overlap.max() < 0.6, "the random directions are not independent of the distilled ones"
    for name, tensor in distilled.state_dict().items():
        if name != "core_encoder":
            assert torch.equal(random.state_dict()[name], tensor), name
    random_fields, distilled_fields = random.config.to_dict(), distilled.config.to_dict()
    assert {n for n in distilled_fields if random_fields[n] != distilled_fields[n]} == {"core_lineage"}


def test_both_cores_start_with_decoders_unrelated_to_their_frozen_rows():
    """The tied initialisation the control once had (decoder = frozen rows, cosine 1) made it a
    working autoencoder from step 0; now neither core's decoder knows its frozen rows."""
    core = distilled_core()
    for kind in (DMSAE, RANDOM_CORE):
        cosines = decoder_to_frozen_cosines(start(kind, core))
        assert cosines.abs().median() < 0.2, (kind.name, cosines.median())


def test_the_baseline_takes_the_same_path_without_a_core():
    baseline = start(BASELINE, distilled_core())
    assert baseline.config.core_size == 0 and baseline.config.core_lineage == []
    assert sum(baseline.config.group_sizes) == K


@pytest.mark.parametrize("factor", [0.5, 2.0, 4.0])
def test_the_rescaled_core_differs_from_the_dmsae_only_in_its_rows_norms(factor):
    core = distilled_core()
    dmsae, rescaled = start(DMSAE, core), start(RESCALED_CORE, core, factor=factor)
    assert differences(rescaled, dmsae) == ({"core_encoder"}, set())  # the lineage too: the same latents of C*
    torch.testing.assert_close(rescaled.core_encoder.norm(dim=-1), factor * core.directions.norm(dim=-1))
    cosines = torch.nn.functional.cosine_similarity(rescaled.core_encoder, dmsae.core_encoder, dim=-1)
    torch.testing.assert_close(cosines, torch.ones(C))
    torch.testing.assert_close(directions(rescaled.core_encoder), directions(core.directions))


@pytest.mark.parametrize("factor", [0.25, 1.0, 4.0])
def test_the_scaled_random_core_differs_from_the_rescaled_distilled_core_only_in_its_directions(factor):
    """random-core-xF is random-core's draws times F (at F = 1, random-core itself), and the control
    of rescaled-core-xF: the same norms, random directions."""
    core = distilled_core()
    random, scaled = start(RANDOM_CORE, core), start(RANDOM_CORE_SCALED, core, factor=factor)
    rescaled = start(RESCALED_CORE, core, factor=factor)
    assert differences(scaled, random) == ({"core_encoder"} if factor != 1 else set(), set())
    torch.testing.assert_close(scaled.core_encoder, factor * random.core_encoder)
    assert differences(scaled, rescaled) == ({"core_encoder"}, {"core_lineage"})
    torch.testing.assert_close(scaled.core_encoder.norm(dim=-1), rescaled.core_encoder.norm(dim=-1))
    config = parse_config(["--dictionary.num_latents", str(K), "--cycles.k", "16"])
    assert core_seed(config, FinalSAE(RANDOM_CORE_SCALED, 16, 2, factor)) == core_seed(config, FinalSAE(RANDOM_CORE, 16, 2))


def test_the_matched_random_core_draws_what_it_always_drew():
    """--transfer.random_core_norm matched (the default) is the control the study trained, bit for bit."""
    core = distilled_core()
    config = parse_config(["--dictionary.num_latents", str(K), "--cycles.k", "16"])
    generator = torch.Generator().manual_seed(core_seed(config, FinalSAE(RANDOM_CORE, 16)))
    before = directions(torch.randn(core.directions.shape, generator=generator)) * core.directions.norm(dim=-1, keepdim=True)
    assert torch.equal(start(RANDOM_CORE, core).core_encoder, before)


@pytest.mark.parametrize("norm", ["matched", "unit", "gaussian", "2", "0.5"])
def test_each_random_core_norm_changes_the_norms_alone(norm):
    core = distilled_core()
    dmsae, matched = start(DMSAE, core), start(RANDOM_CORE, core)
    random = start(RANDOM_CORE, core, "--transfer.random_core_norm", norm)
    assert differences(random, dmsae) == ({"core_encoder"}, {"core_lineage"})
    torch.testing.assert_close(directions(random.core_encoder), directions(matched.core_encoder))  # the same draws
    config = parse_config(["--dictionary.num_latents", str(K), "--cycles.k", "16"])
    generator = torch.Generator().manual_seed(core_seed(config, FinalSAE(RANDOM_CORE, 16)))
    named = {
        "matched": core.directions.norm(dim=-1),
        "unit": torch.ones(C),
        "gaussian": torch.randn(core.directions.shape, generator=generator).norm(dim=-1),  # raw N(0, 1) rows: ~sqrt(d)
    }
    expected = named[norm] if norm in named else float(norm) * core.directions.norm(dim=-1)
    torch.testing.assert_close(random.core_encoder.norm(dim=-1), expected)


def test_the_random_core_norm_setting_accepts_its_options_and_positive_numbers_only():
    for norm in [*RANDOM_CORE_NORMS, "3", "0.25"]:
        assert parse_config(["--transfer.random_core_norm", norm]).transfer.random_core_norm == norm
    for norm in ["bogus", "0", "-1", "1e"]:
        with pytest.raises(ConfigError, match="--transfer.random_core_norm"):
            parse_config(["--transfer.random_core_norm", norm])


def test_a_random_core_norm_written_as_a_yaml_number_is_a_factor(tmp_path):
    config = tmp_path / "norm.yaml"
    config.write_text("transfer:\n  random_core_norm: 2\n")
    core = distilled_core()
    random = start(RANDOM_CORE, core, "--config", str(config))
    torch.testing.assert_close(random.core_encoder.norm(dim=-1), 2 * core.directions.norm(dim=-1))


def test_the_sparse_random_core_differs_from_the_sparse_core_dmsae_only_in_its_directions():
    core = distilled_core()
    sparse, random = start(DMSAE_SPARSE_CORE, core), start(RANDOM_CORE_SPARSE, core)
    assert sparse.config.variant == random.config.variant == DMSAE_SPARSE_CORE.variant
    assert differences(random, sparse) == ({"core_encoder"}, {"core_lineage"})
    torch.testing.assert_close(random.core_encoder.norm(dim=-1), core.directions.norm(dim=-1))
    assert torch.nn.functional.cosine_similarity(random.core_encoder, core.directions, dim=-1).abs().max() < 0.6


def test_the_fixed_random_core_is_the_same_at_every_k_and_another_for_another_seed():
    core = distilled_core()
    at_16, at_64 = start(RANDOM_CORE_FIXED, core, k=16), start(RANDOM_CORE_FIXED, core, k=64)
    assert torch.equal(at_16.core_encoder, at_64.core_encoder)
    assert not torch.allclose(start(RANDOM_CORE_FIXED, core, k=16, seed=1).core_encoder, at_16.core_encoder)
    assert not torch.allclose(start(RANDOM_CORE, core, k=64).core_encoder, start(RANDOM_CORE, core, k=16).core_encoder)
    assert differences(at_64, start(DMSAE, core, k=64)) == ({"core_encoder"}, {"core_lineage"})
    torch.testing.assert_close(at_16.core_encoder.norm(dim=-1), core.directions.norm(dim=-1))


# ---- which SAEs the settings train ---------------------------------------------------------------

TODAY = [  # the default run's final SAEs before the later controls: names, order and kinds
    ("k-0016-dense_core", DMSAE), ("k-0064-dense_core", DMSAE), ("k-0032-dense_core", DMSAE),
    ("k-0032-sparse_core", DMSAE_SPARSE_CORE), ("random-core-k-0032", RANDOM_CORE),
    ("baseline-k-0016", BASELINE), ("baseline-k-0032", BASELINE), ("baseline-k-0064", BASELINE),
]  # fmt: skip
BASELINES = TODAY[-3:]
DEFAULTS = [
    "--transfer.random_core_norm", "matched", "--transfer.core_scale", "--transfer.random_sparse_control", "false",
    "--transfer.random_core_every_k", "false", "--transfer.baseline_ks",
]  # fmt: skip


def trained(*settings: str) -> list[tuple[str, SAEKind]]:
    return [(final.name, final.kind) for final in final_saes(parse_config(list(settings)))]


def test_with_every_new_setting_at_its_default_the_run_trains_what_it_trained():
    assert trained() == TODAY
    assert trained(*DEFAULTS) == TODAY
    assert trained("--transfer.random_core_norm", "unit") == TODAY  # the norm changes a core, not the list


@pytest.mark.parametrize(
    "settings, added",
    [
        (
            ["--transfer.core_scale", "0.5", "2", "4"],
            [(f"rescaled-core-x{f}-k-0032", RESCALED_CORE) for f in ("0.5", "2", "4")]
            + [(f"random-core-x{f}-k-0032", RANDOM_CORE_SCALED) for f in ("0.5", "2", "4")],
        ),
        (["--transfer.random_sparse_control", "true"], [("random-core-sparse-k-0032", RANDOM_CORE_SPARSE)]),
        (["--transfer.random_core_every_k", "true"], [(f"random-core-fixed-k-{k:04d}", RANDOM_CORE_FIXED) for k in (16, 64, 32)]),
    ],
)
def test_each_control_setting_adds_its_controls_after_todays(settings, added):
    assert trained(*settings) == TODAY[:-3] + added + BASELINES


def test_the_sparse_random_core_needs_the_random_control_and_the_sparse_core_dmsae():
    asked = ["--transfer.random_sparse_control", "true"]
    assert trained(*asked, "--transfer.random_core_control", "false") == trained("--transfer.random_core_control", "false")
    assert trained(*asked, "--transfer.sparsity_matched", "false") == trained("--transfer.sparsity_matched", "false")


def test_a_control_brings_what_it_controls():
    """Without the Figure-3 control or any k of 32 in transfer.ks, the rescaled core still has its
    DMSAE at the distillation k beside it."""
    names = [name for name, _ in trained("--transfer.core_scale", "2", "--transfer.random_core_control", "false")]
    assert names.index("k-0032-dense_core") < names.index("rescaled-core-x2-k-0032")
    assert not any(name.startswith("random-core") for name in names)  # the scaled random core needs the Figure-3 control


def test_baselines_at_the_dmsaes_measured_l0():
    extra = [("baseline-k-0128", BASELINE), ("baseline-k-0160", BASELINE)]
    assert trained("--transfer.baseline_ks", "160", "128") == TODAY + extra
    assert trained("--transfer.baseline_ks", "64", "128") == TODAY + extra[:1]  # k = 64 is trained once
    assert trained("--transfer.baseline_ks", "128", "--transfer.baseline", "false") == TODAY[:-3] + extra[:1]


def test_every_setting_at_once_trains_whole_seeds_in_one_order():
    settings = [
        "--transfer.core_scale", "2", "--transfer.random_sparse_control", "true", "--transfer.random_core_every_k", "true",
        "--transfer.baseline_ks", "128", "--transfer.seeds", "0", "1",
    ]  # fmt: skip
    finals = final_saes(parse_config(settings))
    first, second = finals[: len(finals) // 2], finals[len(finals) // 2 :]
    assert {f.seed for f in first} == {0} and {f.seed for f in second} == {1}
    assert [(f.kind, f.k, f.factor) for f in first] == [(f.kind, f.k, f.factor) for f in second]
    assert len({f.name for f in finals}) == len(finals)
    assert second[0].name == "k-0016-dense_core-seed-1" and "rescaled-core-x2-k-0032-seed-1" in {f.name for f in second}


def test_factors_must_name_distinct_sae():
    with pytest.raises(ConfigError, match="--transfer.core_scale 2.0 2.0: must not repeat"):
        parse_config(["--transfer.core_scale", "2", "2.0"])
    with pytest.raises(ConfigError, match="--transfer.core_scale"):
        parse_config(["--transfer.core_scale", "0"])


def test_help_shows_the_control_settings(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    shown = capsys.readouterr().out
    for flag in ("--transfer.random_core_norm", "--transfer.core_scale", "--transfer.random_sparse_control",
                 "--transfer.random_core_every_k", "--transfer.baseline_ks"):  # fmt: skip
        assert flag in shown, flag


# ---- a factor in the run's records, and resuming with controls added ------------------------------


def test_a_factor_names_its_metrics_hub_repo_and_label():
    from trainer.config import HubSettings
    from trainer.run.hub_names import sae_repo_id
    from trainer.run.metrics_file import SAEMetrics
    from trainer.run.stages import cycle0_sae_config

    final = FinalSAE(RESCALED_CORE, 32, 1, 0.5)
    metrics = SAEMetrics({"k": 32.0}, RESCALED_CORE.name, 1, 0.5)
    assert FinalSAE.from_metrics(SAEMetrics.from_json(metrics.to_json())) == final
    assert "factor" not in SAEMetrics({"k": 32.0}, DMSAE.name).to_json()  # other kinds' files as before
    assert final.name == "rescaled-core-x0.5-k-0032-seed-1" and metrics.label == final.label == "distilled core x0.5"
    sae_config = cycle0_sae_config(parse_config(["--dictionary.num_latents", str(K)]), D).with_core([], cycle=1, k=32, variant="dense_core")
    repo = sae_repo_id(sae_config, final, "org/run", HubSettings())
    assert repo.endswith("-k32-rescaled-core-x0.5-seed-1"), repo


def test_a_resume_may_add_controls_and_seeds_but_not_change_the_random_cores_norms(tmp_path):
    """A run folder written before these settings existed (its run_config.yaml lacks them) and with
    transfer SAEs finished: adding controls or seeds is a resume, another random core norm is not."""
    import yaml

    from trainer.run.layout import RunDirectory
    from trainer.run.resume import start_run

    run = tmp_path / "run"
    saved = yaml.safe_load(parse_config(["--run.output_dir", str(run)]).to_yaml())
    for name in ("random_core_norm", "core_scale", "random_sparse_control", "random_core_every_k", "baseline_ks"):
        del saved["transfer"][name]
    (run / "transfer" / "k-0016-dense_core").mkdir(parents=True)
    (run / "run_config.yaml").write_text(yaml.safe_dump(saved))
    resumed = ["--run.output_dir", str(run), "--run.resume", "true"]
    start_run(RunDirectory(run), parse_config(resumed), write=False)
    added = [
        "--transfer.core_scale", "2", "--transfer.random_sparse_control", "true", "--transfer.random_core_every_k", "true",
        "--transfer.seeds", "0", "1",
    ]  # fmt: skip
    start_run(RunDirectory(run), parse_config([*resumed, *added, "--transfer.baseline_ks", "128"]), write=False)
    with pytest.raises(ValueError, match=r"depends on changed settings:\n  transfer.random_core_norm: 'matched' -> 'unit'"):
        start_run(RunDirectory(run), parse_config([*resumed, "--transfer.random_core_norm", "unit"]), write=False)


def test_the_controls_config_is_the_study_with_its_controls_on():
    """bench/study/controls.yaml: the study's settings but for the transfer stage, the shared cache
    and the output folder; the controls at the distillation k on, three seeds of 11 SAEs."""
    from pathlib import Path

    bench = Path(__file__).parent.parent / "bench" / "study"
    study, controls = (parse_config(["--config", str(bench / name)]) for name in ("config.yaml", "controls.yaml"))
    changed = {("harvest", "cache_dir"), ("run", "output_dir")}
    for section in ("model", "data", "harvest", "dictionary", "optimizer", "cycles", "eval", "run"):
        for name, value in vars(getattr(controls, section)).items():
            assert (section, name) in changed or value == getattr(getattr(study, section), name), f"{section}.{name}"
    assert controls.transfer.core == "runs/study/distilled_core" and controls.harvest.cache_dir == "runs/study/cache"
    finals, studied = final_saes(controls), final_saes(study)
    at_k = [f for f in studied if f.k == controls.cycles.k]
    assert [f for f in finals if f in studied] == at_k  # the study's SAEs at the distillation k, in the study's order
    assert len(finals) == 3 * 11 and {f.kind for f in finals} >= {RESCALED_CORE, RANDOM_CORE_SCALED, RANDOM_CORE_SPARSE}
    assert {f.k for f in finals if f.kind is BASELINE} == {32, 128, 160}


# ---- every control through a tiny run: the stage, the report, the browser and the Hub folders ----


def test_a_tiny_run_trains_reports_and_names_every_control(finished_run, tiny_setup, tmp_path):  # noqa: F811
    import json

    from safetensors.torch import load_file
    from test_distill import tiny_args
    from transformers import AutoModel

    from trainer import distill

    output = tmp_path / "controls"
    args = tiny_args(
        tiny_setup, output, "--core", str(finished_run / "distilled_core"), "--harvest.cache_dir", str(finished_run / "cache"),
        "--transfer.ks", "4", "--transfer.baseline", "false", "--transfer.baseline_ks", "12", "--transfer.core_scale", "2",
        "--transfer.random_sparse_control", "true", "--transfer.random_core_every_k", "true", "--transfer.random_core_norm", "unit",
    )  # fmt: skip
    assert distill.main(args) == 0
    expected = [
        "k-0004-dense_core", "k-0008-dense_core", "k-0008-sparse_core", "random-core-k-0008", "random-core-sparse-k-0008",
        "rescaled-core-x2-k-0008", "random-core-x2-k-0008", "random-core-fixed-k-0004", "random-core-fixed-k-0008",
        "baseline-k-0012",
    ]  # fmt: skip
    assert sorted(p.name for p in (output / "transfer").iterdir()) == sorted(expected)
    load = lambda name: AutoModel.from_pretrained(output / "transfer" / name)  # noqa: E731
    core = load_file(finished_run / "distilled_core" / "core_directions.safetensors")["core_directions"]
    torch.testing.assert_close(load("rescaled-core-x2-k-0008").core_encoder, 2 * core)
    torch.testing.assert_close(load("random-core-k-0008").core_encoder.norm(dim=-1), torch.ones(len(core)))
    assert torch.equal(load("random-core-fixed-k-0004").core_encoder, load("random-core-fixed-k-0008").core_encoder)
    assert torch.equal(load("random-core-x2-k-0008").core_encoder, 2 * load("random-core-k-0008").core_encoder)
    assert load("random-core-sparse-k-0008").config.variant == "sparse_core"
    metrics = json.loads((output / "metrics.json").read_text())
    l0_core = {name: (m["l0_core"], m["l0_core_above_threshold"]) for name, m in metrics["transfer"].items()}
    assert l0_core["baseline-k-0012"] == (0, 0)
    assert l0_core["k-0008-sparse_core"][0] == l0_core["k-0008-sparse_core"][1]  # its core is thresholded already
    assert all(above <= core for core, above in l0_core.values()) and any(above < core for core, above in l0_core.values())
    assert metrics["transfer"]["rescaled-core-x2-k-0008"]["factor"] == 2
    assert {row["family"] for row in metrics["consistency"]} == {DMSAE.label, RANDOM_CORE_FIXED.label}
    assert "rows of other norms (--transfer.random_core_norm unit)" in metrics["figure3"]
    summary = (output / "SUMMARY.md").read_text()
    assert "| rescaled-core-x2-k-0008 | distilled core x2 | 8 |" in summary
    assert "DMSAE against random core, same at every k:" in summary
    usage = [line for line in summary.splitlines() if line.startswith(("| random core x2 | 8 |", "| random core (sparse core) | 8 |"))]
    assert len(usage) == 2, "the core-usage table lists every frozen core"
    assert "![every core](figures/l0_core_every_core.png)" in summary and (output / "figures" / "l0_core_every_core.png").exists()
    hub = {p.name for p in (output / "hub" / "saes").iterdir()}
    assert len(hub) == len(expected) and any(name.endswith("-k8-rescaled-core-x2") for name in hub), hub


def test_the_first_group_config_is_the_study_with_a_larger_first_group():
    """bench/study/first_group.yaml: the study's cycles but for the Matryoshka group fractions (a first
    group ten times the study's core, larger than the core it selects, as the paper's is), on the study's cache."""
    from pathlib import Path

    from modeling_dmsae.configuration_dmsae import matryoshka_group_sizes

    bench = Path(__file__).parent.parent / "bench" / "study"
    study, larger = (parse_config(["--config", str(bench / name)]) for name in ("config.yaml", "first_group.yaml"))
    changed = {("dictionary", "group_fractions"), ("harvest", "cache_dir"), ("run", "output_dir")}
    for section in ("model", "data", "harvest", "dictionary", "optimizer", "cycles", "eval", "run"):
        for name, value in vars(getattr(larger, section)).items():
            assert (section, name) in changed or value == getattr(getattr(study, section), name), f"{section}.{name}"
    assert larger.harvest.cache_dir == "runs/study/cache" and larger.run.output_dir != study.run.output_dir
    K = study.dictionary.num_latents
    first = matryoshka_group_sizes(K, larger.dictionary.group_fractions)[0]
    assert matryoshka_group_sizes(K, study.dictionary.group_fractions)[0] == 64 and first == 1024  # the study's core: 52-124
