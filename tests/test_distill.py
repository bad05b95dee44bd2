"""`trainer/distill.py` end to end on a tiny random Gemma 2: every stage, resume, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file
from tiny_models import SENTENCES, tiny_model, tiny_tokenizer
from transformers import AutoModel

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer import distill
from trainer.errors import ConfigError
from trainer.run.kinds import KINDS
from trainer.sae.training import SAETrainer


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Gemma 2 with its tokenizer saved locally, and a local JSON-lines corpus."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "gemma2"
    tiny_model("gemma2").save_pretrained(model_dir)
    tiny_tokenizer(adds_bos=True).save_pretrained(model_dir)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as file:
        for i in range(400):
            file.write(json.dumps({"text": f"{SENTENCES[i % 4]} Document {i}: {SENTENCES[(i * 7) % 4]}"}) + "\n")
    return {"model": model_dir, "corpus": corpus}


def tiny_args(setup: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "--model.model", str(setup["model"]), "--model.hook_module", "model.layers.2",
        "--data.dataset", str(setup["corpus"]), "--data.context_length", "32",
        "--harvest.train_tokens", "8192", "--harvest.attribution_tokens", "512", "--harvest.positions_per_context", "16",
        "--harvest.batch_size", "8", "--harvest.attribution_batch_size", "8", "--harvest.contexts_per_shard", "32",
        "--dictionary.num_latents", "256", "--dictionary.dead_tokens_threshold", "4096",
        "--optimizer.warmup_steps", "2", "--optimizer.lr", "0.003", "--optimizer.calibration_tokens", "2048",
        "--cycles.num_cycles", "2", "--cycles.k", "8", "--cycles.tau", "0.9",
        "--cycles.tokens_per_cycle", "3072", "--cycles.batch_size", "256",
        "--transfer.ks", "4", "16", "--transfer.tokens", "2048",
        "--eval.tokens", "1024", "--eval.ce_contexts", "4",
        "--run.output_dir", str(output), "--run.checkpoint_every", "3", "--run.log_every", "2", "--run.log_with", "none",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_setup, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("run") / "run"
    assert distill.main(tiny_args(tiny_setup, output, "--run.log_with", "tensorboard")) == 0
    return output


def test_tracker_events_go_to_logs(finished_run):
    """README: logs/ holds the training curves, the tracker's events included."""
    assert list((finished_run / "logs" / "dmsae").rglob("events.out.tfevents.*"))
    assert not (finished_run / "dmsae").exists()


def test_every_stage_leaves_its_artifacts(finished_run):
    run = finished_run
    for t in range(3):
        folder = run / "cycles" / f"cycle-{t:03d}"
        core = json.loads((folder / "core.json").read_text())
        assert core["cycle"] == t and len(core["selected"]) == len(core["lineage"]) == len(core["scores"]) > 0
        assert core["scores"] == sorted(core["scores"], reverse=True)
        directions = load_file(folder / "core_directions.safetensors")["core_directions"]
        model = AutoModel.from_pretrained(folder)
        assert torch.equal(directions, model.encoder_weight[core["selected"]].detach())
        if t > 0:  # the frozen core of cycle t is the core selected after cycle t-1
            previous = load_file(run / "cycles" / f"cycle-{t - 1:03d}" / "core_directions.safetensors")["core_directions"]
            assert torch.equal(model.core_encoder, previous)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["transfer"]) == {
        "k-0004-dense_core", "k-0016-dense_core", "k-0008-dense_core", "k-0008-sparse_core", "random-core-k-0008",
        "baseline-k-0004", "baseline-k-0008", "baseline-k-0016",
    }  # fmt: skip
    for k in (4, 8, 16):  # the plain Matryoshka baselines: no core, the DMSAEs' K and groups
        baseline = AutoModel.from_pretrained(run / "transfer" / f"baseline-k-{k:04d}")
        assert baseline.config.core_size == 0 and baseline.config.k == k
        assert sum(baseline.config.group_sizes) == baseline.config.num_latents == 256
    for name in ("fve", "mse", "l0_core", "l0_noncore", "l0", "dead_fraction", "loss_recovered", "ce_loss_spliced"):
        assert all(name in m for m in metrics["cycles"].values()), name
    trained = [*metrics["cycles"].values(), *metrics["transfer"].values()]
    assert all(-1 <= m["decoder_cosine_to_init"] < 1 for m in trained)  # every SAE here was trained, so moved
    assert all(0 < row["chance_mean_max_cosine"] < 1 for row in metrics["consistency"])
    figures = ("core_lineage.png", "l0_core_distilled_vs_random.png", "coverage_curve.png", "sparsity_fidelity.png", "dictionary_movement.png")
    for stage in ("cycle-000", "transfer-k-0016-dense_core"):  # the movement curve: logged, falling from 1 as training moves the decoder
        curve = [json.loads(line)["decoder_cosine_to_init"] for line in (run / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        assert len(curve) > 1 and curve[-1] < curve[0] <= 1
    for figure in (*figures, "consistency_across_sparsities.png"):
        assert (run / "figures" / figure).read_bytes().startswith(b"\x89PNG")
    pairs = {(row["family"], row["k_a"], row["k_b"]) for row in metrics["consistency"]}
    assert pairs == {(f, a, b) for f in ("DMSAE (dense core)", "Matryoshka baseline") for a, b in ((4, 8), (4, 16), (8, 16))}
    c = metrics["transfer"]["k-0008-dense_core"]["core_size"]
    assert all(row["core"]["latents"] == c and row["rest"]["latents"] == 256 - c for row in metrics["consistency"])
    summary = (run / "SUMMARY.md").read_text()
    assert "distilled_core/" in summary and metrics["figure3"] in summary and "random initialisation" in summary
    assert "Core encoder biases after training (seed 0): random core " in metrics["figure3"]
    for name in metrics["transfer"]:  # every final SAE is a row of the results table
        assert f"| {name} |" in summary
    assert all(f"](figures/{figure})" in summary for figure in figures)
    assert set(json.loads((run / "timings.json").read_text())) >= {"harvest", "cycle training", "attribution", "transfer training"}


def test_transfer_stage_freezes_the_distilled_core(finished_run):
    core = json.loads((finished_run / "distilled_core" / "core.json").read_text())
    final_cycle = json.loads((finished_run / "cycles" / "cycle-002" / "core.json").read_text())
    cycle2 = AutoModel.from_pretrained(finished_run / "cycles" / "cycle-002")
    assert core["selected"] == [j for j in final_cycle["selected"] if j < cycle2.config.core_size]  # Eq. 8
    directions = load_file(finished_run / "distilled_core" / "core_directions.safetensors")["core_directions"]
    for k in (4, 16):
        sae = AutoModel.from_pretrained(finished_run / "transfer" / f"k-{k:04d}-dense_core")
        assert sae.config.k == k and sae.config.core_size == len(core["selected"])
        assert torch.equal(sae.core_encoder, directions)
        assert sae.config.core_lineage == core["lineage"]
    control = AutoModel.from_pretrained(finished_run / "transfer" / "random-core-k-0008")
    assert control.config.core_size == len(core["selected"]) and not torch.equal(control.core_encoder, directions)


def test_transfer_seeds_train_every_final_sae_once_per_seed(tiny_setup, finished_run, tmp_path):
    """--transfer.seeds 0 1 from the finished run's core: seed 0 is bit for bit the SAE the run
    without seeds trained (seeding by name), seed 1 another draw of everything but the core; the
    report gives spreads over the seeds, and every seed gets its own Hub folder."""
    output = tmp_path / "seeds"
    args = tiny_args(
        tiny_setup, output, "--core", str(finished_run / "distilled_core"), "--harvest.cache_dir", str(finished_run / "cache"),
        "--transfer.ks", "4", "--transfer.sparsity_matched", "false", "--transfer.seeds", "0", "1",
    )  # fmt: skip
    assert distill.main(args) == 0
    transfer = output / "transfer"
    assert {p.name for p in transfer.iterdir()} == {
        f"{name}{suffix}" for name in ("k-0004-dense_core", "k-0008-dense_core", "random-core-k-0008", "baseline-k-0004", "baseline-k-0008")
        for suffix in ("", "-seed-1")
    }  # fmt: skip
    load = lambda folder: AutoModel.from_pretrained(folder)  # noqa: E731
    for name in ("k-0004-dense_core", "random-core-k-0008", "baseline-k-0004"):
        seed0, seed1, unseeded = load(transfer / name), load(transfer / f"{name}-seed-1"), load(finished_run / "transfer" / name)
        assert all(torch.equal(a, b) for a, b in zip(seed0.state_dict().values(), unseeded.state_dict().values())), name
        assert not torch.equal(seed0.W_dec, seed1.W_dec), name
    distilled = [load(transfer / f"k-0004-dense_core{s}").core_encoder for s in ("", "-seed-1")]
    random_cores = [load(transfer / f"random-core-k-0008{s}").core_encoder for s in ("", "-seed-1")]
    assert torch.equal(*distilled) and not torch.equal(*random_cores)  # one C*; a fresh random core per seed
    metrics = json.loads((output / "metrics.json").read_text())
    assert {m["seed"] for m in metrics["transfer"].values()} == {0, 1}
    assert {row["seed"] for row in metrics["consistency"]} == {0, 1}
    assert metrics["figure3"].startswith("At k = 8, 2 seeds") and re.search(r"it (fell|did not fall) in [0-2] of 2 seeds", metrics["figure3"])
    summary = (output / "SUMMARY.md").read_text()
    assert "### Over seeds" in summary
    fve = [m["fve"] for name, m in metrics["transfer"].items() if name.startswith("baseline-k-0004")]
    assert "| Matryoshka baseline | 4 | 2 |" in summary and f"[{min(fve):.3f}, {max(fve):.3f}]" in summary
    hub_names = {p.name for p in (output / "hub" / "saes").iterdir()}
    assert len(hub_names) == 10 and sum(name.endswith("-seed-1") for name in hub_names) == 5
    cards = {name: (output / "hub" / "saes" / name / "README.md").read_text() for name in hub_names}
    assert all(("Trained with transfer seed 1" in card) == name.endswith("-seed-1") for name, card in cards.items())


def _browser_data(path: Path):
    """The payload of one browser data file (``DMSAE.add(name, payload);``)."""
    text = path.read_text()
    assert text.startswith("DMSAE.add(") and text.endswith(");\n")
    name, _, payload = text[len("DMSAE.add(") : -3].partition(", ")
    return json.loads(name), json.loads(payload)


def test_every_sae_has_its_evidence_and_the_browser_shows_the_core(finished_run):
    run = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    folders = {**{f"cycle-{t:03d}": run / "cycles" / f"cycle-{t:03d}" for t in range(3)}, **{n: run / "transfer" / n for n in metrics["transfer"]}}
    for name, folder in folders.items():  # every SAE: its firing frequencies, from the evaluation's own pass
        frequency = load_file(folder / "firing_frequencies.safetensors")["firing_frequency"]
        stage = metrics["cycles"].get(name) or metrics["transfer"][name]
        assert frequency.shape == (256,) and abs(float((frequency == 0).float().mean()) - stage["dead_fraction"]) < 1e-9
        assert (folder / "latent_evidence.safetensors").exists() == name.startswith(tuple(metrics["transfer"]))
    for name in metrics["transfer"]:  # every final SAE: the whole per-latent evidence
        folder = run / "transfer" / name
        evidence = load_file(folder / "latent_evidence.safetensors")
        frequency = load_file(folder / "firing_frequencies.safetensors")["firing_frequency"]
        assert torch.equal(frequency, evidence["firing_frequency"])
        settings = json.loads((folder / "latent_evidence.json").read_text())
        assert settings["format"].startswith("dmsae-latent-evidence/")
        tokens = evidence["context_tokens"]
        fired = evidence["example_context"][:, 0] >= 0
        assert torch.equal(fired, frequency > 0)
        centre = settings["window"]["before"]  # the window's centre is the example's own activation
        assert torch.allclose(evidence["window_activations"][fired, 0, centre].float(), evidence["example_activation"][fired, 0], rtol=2e-3)
        assert {str(int(t)) for t in tokens.unique()} <= set(settings["token_text"])
    for hub_folder in [*(run / "hub" / "saes").iterdir(), *(p for p in (run / "hub" / "run").glob("cycle-*") if p.is_dir())]:
        assert (hub_folder / "firing_frequencies.safetensors").exists() and "browser/" in (hub_folder / "README.md").read_text()
        assert (hub_folder / "latent_evidence.safetensors").exists() == (hub_folder.parent.name == "saes")

    browser = run / "browser"
    page = (browser / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing to fetch
    assert "browser/index.html" in (run / "SUMMARY.md").read_text()
    assert sorted(p.name for p in (run / "hub" / "run" / "browser").iterdir()) == sorted(p.name for p in browser.iterdir())
    _, index = _browser_data(browser / "run.js")
    assert {s["name"] for s in index["saes"]} == set(metrics["transfer"])
    core = json.loads((run / "distilled_core" / "core.json").read_text())
    assert [entry["key"] for entry in index["core"]] == core["lineage"]
    for entry in index["core"]:  # every selection is the cycle's own record of that latent
        assert entry["selections"] and entry["selections"][0]["cycle"] == entry["origin_cycle"] == entry["key"][0]
        for selection in entry["selections"]:
            cycle = json.loads((run / "cycles" / f"cycle-{selection['cycle']:03d}" / "core.json").read_text())
            assert cycle["lineage"][selection["rank"]] == entry["key"] and cycle["selected"][selection["rank"]] == selection["index"]
            assert cycle["scores"][selection["rank"]] == selection["score"]
    carriers = [s for s in index["saes"] if KINDS[s["kind"]].keeps_distilled_core]
    assert len(carriers) == 4 and all(s["core_latents"] == {str(i): i for i in range(len(core["lineage"]))} for s in carriers)
    _, contexts = _browser_data(browser / "contexts.js")
    sae = carriers[0]
    _, shard = _browser_data(browser / f"{sae['name']}.000.js")
    _, summary = _browser_data(browser / f"{sae['name']}.summary.js")
    assert len(summary) == sae["num_latents"] and len(shard) == min(index["shard_size"], sae["num_latents"])
    fires = [j for j in range(len(core["lineage"])) if summary[j][0] > 0]
    assert fires, "no core latent fires on the held-out tokens"
    details = shard[fires[0]]
    assert details["examples"] and len(details["promoted"]) == len(details["suppressed"]) > 0
    for slot, context, position, value, window in details["examples"]:
        assert contexts[context][position] is not None and window[sae["window_before"]] is not None
        assert str(contexts[context][position]) in index["token_text"]


def test_resume_after_a_kill_mid_cycle_gives_the_same_cores(tiny_setup, finished_run, tmp_path, monkeypatch):
    output = tmp_path / "killed"
    original_step = SAETrainer.step
    calls = {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 12 + 7:  # cycle 0 takes 12 steps: die in cycle 1 after its step-6 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        distill.main(tiny_args(tiny_setup, output))
    assert (output / "cycles" / "cycle-000").exists() and not (output / "cycles" / "cycle-001").exists()
    assert (output / "checkpoints" / "cycle-001" / "checkpoint.pt").exists()
    monkeypatch.setattr(SAETrainer, "step", original_step)
    assert distill.main(tiny_args(tiny_setup, output, "--run.resume", "true")) == 0
    for t in range(3):
        ours = json.loads((output / "cycles" / f"cycle-{t:03d}" / "core.json").read_text())
        reference = json.loads((finished_run / "cycles" / f"cycle-{t:03d}" / "core.json").read_text())
        assert ours["selected"] == reference["selected"], f"cycle {t}"
    assert json.loads((output / "distilled_core" / "core.json").read_text())["selected"] == json.loads(
        (finished_run / "distilled_core" / "core.json").read_text()
    )["selected"]


def test_resume_with_a_changed_config_is_refused(tiny_setup, finished_run):
    with pytest.raises(ValueError, match=r"cycles.k: 8 -> 12"):
        distill.main(tiny_args(tiny_setup, finished_run, "--run.resume", "true", "--cycles.k", "12"))


def test_existing_run_without_resume_is_refused(tiny_setup, finished_run):
    with pytest.raises(FileExistsError, match="--run.resume true"):
        distill.main(tiny_args(tiny_setup, finished_run))


@pytest.mark.parametrize(
    "override, field",
    [
        (["--cycles.tau", "1.5"], "cycles.tau"),
        (["--cycles.variant", "dense"], "cycles.variant"),
        (["--transfer.variants", "both"], "transfer.variants"),
        (["--cycles.num_cycles", "0"], "cycles.num_cycles"),
        (["--run.log_with", "mlflow"], "run.log_with"),
        (["--transfer.seeds", "0", "0"], "transfer.seeds"),
        (["--transfer.seeds", "-1"], "transfer.seeds"),
    ],
)
def test_config_errors_name_the_field(tiny_setup, tmp_path, override, field):
    with pytest.raises(ValueError, match=field):
        distill.main(tiny_args(tiny_setup, tmp_path / "bad", *override))


def test_a_core_too_large_for_the_dictionary_names_tau_and_keeps_the_cycle(tiny_setup, tmp_path):
    """How many latents reach coverage tau is known only after a cycle: a core the next cycle's last
    Matryoshka group cannot give room to is a ConfigError naming the settings, and C(t) stays saved."""
    output = tmp_path / "run"
    args = tiny_args(tiny_setup, output, "--cycles.tau", "1.0", "--dictionary.group_fractions", "0.5", "0.45", "0.05")
    with pytest.raises(ConfigError, match=r"--cycles.tau 1.0: cycle 0 selected \d+ core latents, more than the 12 that fit in K = 256") as error:
        distill.main(args)
    selected = json.loads((output / "cycles" / "cycle-000" / "core.json").read_text())["selected"]
    assert str(len(selected)) in str(error.value) and len(selected) > 12
    assert not (output / "cycles" / "cycle-001").exists()


def test_dictionary_errors_name_the_field_in_a_dry_run(tiny_setup, tmp_path, capsys):
    with pytest.raises(ValueError, match="DMSAEConfig.k"):
        distill.main(tiny_args(tiny_setup, tmp_path / "bad", "--cycles.k", "300", "--run.dry_run", "true"))
    assert distill.main(tiny_args(tiny_setup, tmp_path / "ok", "--run.dry_run", "true")) == 0
    plan = capsys.readouterr().out
    assert "cycles 1..2" in plan and "K = 256" in plan and "GiB (ddp: one whole SAE" in plan
    assert not (tmp_path / "ok").exists(), "a dry run writes nothing"


def other_width_sae(folder: Path) -> Path:
    """A cycle-0 SAE the tiny run refuses, once it has read it: its width is not the model's."""
    DMSAEModel(DMSAEConfig(d_in=48, num_latents=256, group_sizes=[64, 192], k=8, hook_module="model.layers.2")).save_pretrained(folder)
    return folder


def test_cycle0_checkpoint_mismatch_is_caught_before_training(tiny_setup, tmp_path):
    args = tiny_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", str(other_width_sae(tmp_path / "other-width")))
    with pytest.raises(ValueError, match="width d = 48"):
        distill.main(args)
    assert not (tmp_path / "run" / "cycles").exists()


def test_cycle0_checkpoint_from_a_hub_folder(tiny_setup, tmp_path, hub, capsys, monkeypatch):
    """--cycles.cycle0_checkpoint ORG/NAME[@REVISION][:SUBFOLDER] is downloaded and read as cycle 0
    (and refused, as a local one, for its width); offline and not cached, one line names it."""
    repo = f"{hub.org}/published-saes"
    HfApi().create_repo(repo)
    HfApi().upload_folder(repo_id=repo, folder_path=other_width_sae(tmp_path / "sae"), path_in_repo="layer-2/k-8")
    with pytest.raises(ConfigError, match=f"--cycles.cycle0_checkpoint {repo}@main:layer-2/k-8 does not match .* width d = 48"):
        distill.main(tiny_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", f"{repo}@main:layer-2/k-8"))
    with pytest.raises(ConfigError, match=f"{repo} has no folder 'layer-3'"):
        distill.main(tiny_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", f"{repo}:layer-3"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    never_fetched = f"{hub.org}/other-saes:layer-2"
    capsys.readouterr()  # the uploads' progress bars
    assert distill.cli(tiny_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", never_fetched)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--cycles.cycle0_checkpoint {never_fetched} (not a local path)" in err and "unset HF_HUB_OFFLINE" in err
    assert distill.main(tiny_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", never_fetched, "--dry-run")) == 0
    assert f"the cycle-0 checkpoint {never_fetched} was not read" in capsys.readouterr().out  # a dry run offline says what it skipped
    assert not (tmp_path / "run").exists()


# ---- Publishing from the run (the Hub side itself is tested in test_hub.py) ---------------------


def test_push_to_hub_from_the_run_then_transfer_from_a_pushed_core(tiny_setup, tmp_path, hub):
    repo = f"{hub.org}/tiny-distill"
    output = tmp_path / "pushed"
    assert distill.main(tiny_args(tiny_setup, output, "--push-to-hub", repo, "--transfer.random_core_control", "false")) == 0
    assert set(hub.server.repo(repo).tags) == {"cycle-0", "cycle-1", "cycle-2", "distilled"}
    cycle2 = hub.server.files(repo, "cycle-2")
    assert cycle2["cycle-2/core.json"] == (output / "cycles" / "cycle-002" / "core.json").read_bytes()
    final_repo = f"{hub.org}/dmsae-gemma2-l2-k16"
    sae = AutoModel.from_pretrained(final_repo)
    local = AutoModel.from_pretrained(output / "transfer" / "k-0016-dense_core")
    assert torch.equal(sae.W_dec, local.W_dec) and sae.config.k == 16
    assert hub.token not in "".join(p.read_text(errors="ignore") for p in output.rglob("*") if p.is_file() and p.suffix in {".json", ".yaml", ".md", ".jsonl"})

    # A transfer stage that starts from cycle 2's pushed core.
    transfer_only = tmp_path / "from-core"
    assert distill.main(tiny_args(tiny_setup, transfer_only, "--core", f"{repo}@cycle-2", "--transfer.random_core_control", "false")) == 0
    assert not (transfer_only / "cycles").exists()
    core = load_file(output / "cycles" / "cycle-002" / "core_directions.safetensors")["core_directions"]
    assert torch.equal(AutoModel.from_pretrained(transfer_only / "transfer" / "k-0004-dense_core").core_encoder, core)


def test_hub_failure_never_stops_the_run_and_push_only_finishes_it(tiny_setup, tmp_path, hub, caplog):
    repo = f"{hub.org}/flaky"
    output = tmp_path / "flaky"
    hub.server.fail("commit", after=1, times=10_000, mode="drop")  # cycle 0 arrives, then the network dies
    args = tiny_args(
        tiny_setup, output, "--push-to-hub", repo, "--transfer.random_core_control", "false", "--hub.max_attempts", "1",
        # repo names of their own: the client caches resolved revisions by repo id across test servers
        "--hub.sae_repo_pattern", "{org}/flaky-{model}-l{layer}-k{k}{suffix}",
    )
    assert distill.main(args) == 0
    assert (output / "transfer" / "k-0016-dense_core" / "model.safetensors").exists()
    assert "--push-only" in caplog.text
    assert set(hub.server.repo(repo).tags) == {"cycle-0"}
    hub.server.faults.clear()
    assert distill.main(["--push-only", str(output), "--push-to-hub", repo]) == 0
    assert set(hub.server.repo(repo).tags) == {"cycle-0", "cycle-1", "cycle-2", "distilled"}
    assert AutoModel.from_pretrained(f"{hub.org}/flaky-gemma2-l2-k4").config.k == 4
