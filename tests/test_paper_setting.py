"""What the paper's setting on a GPU node relies on, on the tiny random Gemma 2 of test_distill:
the run's k governs every cycle, seeds go by name, a stage's SAE and optimiser are released when
it ends, accumulation-aware checkpoints resume bit for bit, the Hub's names are checked up front
and a Hub problem never stops the run, and the paper config's plan is readable offline."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModel

from modeling_dmsae import DMSAEConfig, DMSAEModel
from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)
from trainer import distill
from trainer.config import CONFIG_DIR, parse_config
from trainer.harvest import harvested
from trainer.pipeline.context import RunContext
from trainer.run.layout import RunDirectory
from trainer.run.stages import final_saes
from trainer.sae.training import SAETrainer

REPO = Path(__file__).resolve().parent.parent
ONE_CYCLE_ONE_FINAL = (
    "--cycles.num_cycles", "1", "--transfer.ks", "8", "--transfer.random_core_control", "false",
    "--transfer.sparsity_matched", "false", "--transfer.baseline", "false",
)  # fmt: skip


def saved_checkpoint(folder: Path, k: int) -> Path:
    """A cycle-0 DMSAE for the tiny model's layer 2, trained (say) at ``k`` with its own AuxK,
    dead-latent threshold and inference threshold."""
    config = DMSAEConfig(
        d_in=32, num_latents=256, group_sizes=[64, 192], k=k, aux_alpha=0.5, dead_tokens_threshold=123,
        hook_module="model.layers.2", threshold=0.25, base_model_id="",
    )  # fmt: skip
    torch.manual_seed(0)
    DMSAEModel(config).save_pretrained(folder)
    return folder


def test_a_checkpoint_at_another_k_is_refused_before_the_base_model_loads(tiny_setup, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(harvested, "load_base_model", no_loading)
    checkpoint = saved_checkpoint(tmp_path / "k4", k=4)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"trained at k = 4, the run's cycles train at --cycles.k 8: .*--cycles.accept_checkpoint_k true"):
        distill.main(tiny_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", str(checkpoint)))
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists()


def test_the_runs_settings_govern_every_cycle_after_an_imported_one(tiny_setup, tmp_path):
    """Accepted knowingly, a k = 4 checkpoint is selected from and followed at the run's k = 8."""
    checkpoint = saved_checkpoint(tmp_path / "k4", k=4)
    output = tmp_path / "run"
    args = tiny_args(tiny_setup, output, "--cycles.cycle0_checkpoint", str(checkpoint), "--cycles.accept_checkpoint_k", "true")
    assert distill.main([*args, *ONE_CYCLE_ONE_FINAL]) == 0
    run = parse_config(args)
    for t in (0, 1):
        config = AutoModel.from_pretrained(RunDirectory(output).cycle(t)).config
        assert config.k == 8, f"cycle {t}"
        assert (config.aux_alpha, config.dead_tokens_threshold) == (run.dictionary.aux_alpha, run.dictionary.dead_tokens_threshold)
    cycle0 = AutoModel.from_pretrained(RunDirectory(output).cycle(0)).config
    assert cycle0.threshold < 0, "a threshold calibrated at k = 4 must not be used at k = 8"


def test_the_same_named_sae_is_the_same_whatever_else_the_run_trains(tiny_setup, tmp_path):
    """Seeds by name: k-0008-dense_core from --transfer.ks 4 8 and from --transfer.ks 8, bit for bit."""
    source = tmp_path / "source"
    assert distill.main([*tiny_args(tiny_setup, source), *ONE_CYCLE_ONE_FINAL]) == 0
    core = str(RunDirectory(source).distilled_core)
    weights = {}
    for ks in (["4", "8"], ["8"]):
        output = tmp_path / f"ks-{'-'.join(ks)}"
        assert distill.main([*tiny_args(tiny_setup, output, "--core", core), *ONE_CYCLE_ONE_FINAL, "--transfer.ks", *ks]) == 0
        weights[len(ks)] = (RunDirectory(output).transfer("k-0008-dense_core") / "model.safetensors").read_bytes()
    assert weights[1] == weights[2]


def test_each_stage_releases_its_sae_and_optimiser(tiny_setup, tmp_path, monkeypatch):
    """The accelerator holds one model and one optimiser at a time, every stage's optimiser (its Adam
    moments) is freed when the stage ends, and resident memory does not grow per stage."""
    prepared, optimizers, resident = [], [], []
    original_init = SAETrainer.__init__

    def spying_init(self, *args, **kwargs):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: RSS then counts what is held
        resident.append(_resident_bytes())
        original_init(self, *args, **kwargs)
        prepared.append((len(self.accelerator._models), len(self.accelerator._optimizers)))
        optimizers.append(weakref.ref(self.optimizer.optimizer))

    monkeypatch.setattr(SAETrainer, "__init__", spying_init)
    # K = 16384: one stage's SAE with its gradients and Adam state is 17 MB, so a leak of one per stage
    # (117 MB over the 7 stages measured) stands above the allocator's noise once freed heap is trimmed.
    args = tiny_args(tiny_setup, tmp_path / "run", "--dictionary.num_latents", "16384", "--transfer.ks", "8", "16")
    assert distill.main(args) == 0
    gc.collect()
    assert len(prepared) == 3 + len(final_saes(parse_config(args)))  # cycles 0-2 and every final SAE
    assert all(counts == (1, 1) for counts in prepared), prepared
    assert not any(ref() is not None for ref in optimizers), "a finished stage's optimiser is still referenced"
    growth = resident[-1] - resident[1]
    one_stage = 4 * 2 * 16384 * 32 * 4  # weights, gradients and Adam's two moments of W_enc and W_dec, fp32
    assert growth < 3 * one_stage, f"resident memory grew {growth / 2**20:.1f} MiB over {len(resident) - 2} stages"


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_checkpoints_fall_on_optimiser_steps_so_a_kill_under_accumulation_resumes_bit_for_bit(tiny_setup, tmp_path, monkeypatch):
    accumulate = ("--run.gradient_accumulation_steps", "2", "--run.checkpoint_every", "3", *ONE_CYCLE_ONE_FINAL)
    reference = tmp_path / "reference"
    assert distill.main([*tiny_args(tiny_setup, reference), *accumulate]) == 0
    original_step, calls = SAETrainer.step, {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 24 + 10:  # cycle 0: 24 micro-steps; in cycle 1, half-way through optimiser step 5
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", dying_step)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        distill.main([*tiny_args(tiny_setup, killed), *accumulate])
    checkpoint = torch.load(RunDirectory(killed).checkpoint("cycle-001") / "checkpoint.pt", weights_only=True)
    # Optimiser step 3 ends at micro-step 6; a checkpoint every 3 micro-steps would have kept micro-step 9,
    # half of optimiser step 5, whose first gradient is then lost.
    assert checkpoint["steps_taken"] == 6, "the checkpoint fell inside an optimiser step"
    monkeypatch.setattr(SAETrainer, "step", original_step)
    assert distill.main([*tiny_args(tiny_setup, killed, "--run.resume", "true"), *accumulate]) == 0
    for stage in ("cycles/cycle-001", "transfer/k-0008-dense_core"):
        assert (killed / stage / "model.safetensors").read_bytes() == (reference / stage / "model.safetensors").read_bytes(), stage
    logged = [json.loads(line)["step"] for line in (killed / "logs" / "cycle-001.jsonl").read_text().splitlines()]
    assert logged == [0, 2, 4, 6, 8, 10, 11], "log records are numbered by optimiser step, each once"


def test_an_invalid_hub_name_is_refused_before_loading(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.setattr(harvested, "load_base_model", lambda *a, **k: pytest.fail("the base model was loaded"))
    with pytest.raises(ValueError, match="not a valid repo id"):
        distill.main(tiny_args(tiny_setup, tmp_path / "run", "--push-to-hub", "not a/valid//name"))
    with pytest.raises(ValueError, match=r"--hub.sae_repo_pattern .* invalid repo id"):
        distill.main(tiny_args(tiny_setup, tmp_path / "run", "--push-to-hub", "org/run", "--hub.sae_repo_pattern", "{org}/bad name-{k}"))


def test_no_hub_problem_stops_the_run(tmp_path, caplog):
    """Any exception from a push (not only a HubPushError) is logged with its traceback; the run goes on."""
    config = parse_config(["--push-to-hub", "org/run", "--run.output_dir", str(tmp_path)])

    class BrokenPublisher:
        def push_run(self):
            raise ValueError("a bug in publishing")

    context = RunContext(config, Accelerator(cpu=True), RunDirectory(tmp_path), None, BrokenPublisher())
    context.publish(lambda publisher: publisher.push_run())
    assert "a bug in publishing" in caplog.text and "--push-only" in caplog.text


def test_the_paper_plan_is_readable_without_network():
    """--dry-run with the Hub unreachable: the whole plan, with what it could not check."""
    environment = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [
        sys.executable, str(REPO / "trainer" / "distill.py"), "--config", str(CONFIG_DIR / "paper_gemma2_l12.yaml"),
        "--dry-run", "--plan.num_processes", "8",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.perf_counter() - start < 60
    plan = result.stdout
    assert "2,048 tokens per optimisation step, all processes together: 1 micro-batch(es) of 256 tokens per process" in plan
    assert "244,141 steps (500,000,000 tokens, 62,500,000 per process)" in plan
    assert "cycles ~0.95 GiB (latent-parallel: 1/8 of the latents, 2,048 tokens)" in plan
    assert "not checked     the dataset monology/pile-uncopyrighted was not opened" in plan
    assert "http://127.0.0.1:9 is unreachable" in plan


def test_a_number_of_processes_that_cannot_share_the_lanes_is_refused():
    with pytest.raises(ValueError, match="3 processes cannot share --cycles.data_lanes 8 evenly"):
        distill.main(["--dry-run", "--plan.num_processes", "3"])
    with pytest.raises(ValueError, match=r"--cycles.batch_size 1020: must be a multiple of .* = 8"):
        parse_config(["--cycles.batch_size", "1020"])


def test_the_study_is_the_default_method_scaled_as_its_header_says():
    """bench/study/config.yaml (issue 19): the default run's method and stages, three transfer seeds, and
    only the settings its header names changed; every final SAE of it is trained once per seed."""
    study = parse_config(["--config", str(REPO / "bench" / "study" / "config.yaml")])
    default = parse_config([])
    scaled = {
        ("harvest", "train_tokens"): 819_200, ("dictionary", "num_latents"): 2048, ("cycles", "tokens_per_cycle"): 2_048_000,
        ("transfer", "tokens"): 2_048_000, ("transfer", "seeds"): [0, 1, 2], ("eval", "tokens"): 65_536, ("eval", "ce_contexts"): 32,
        ("run", "output_dir"): "runs/study", ("run", "checkpoint_every"): 250, ("run", "log_every"): 20,
    }  # fmt: skip
    for section in ("model", "data", "harvest", "dictionary", "optimizer", "cycles", "transfer", "eval", "run"):
        for name, value in vars(getattr(study, section)).items():
            expected = scaled.get((section, name), getattr(getattr(default, section), name))
            assert value == expected, f"{section}.{name}"
    runs = final_saes(study)
    assert len(runs) == 3 * len(final_saes(default)) and {r.seed for r in runs} == {0, 1, 2}
