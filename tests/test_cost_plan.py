"""The --dry-run cost plan: passes, disk and wall time per stage from a measured throughput table;
a kind of device never measured is said so, not guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import parse_config
from trainer.report import dry_run
from trainer.report.dry_run import base_model_key, describe_plan
from trainer.run import parallelism
from trainer.run.parallelism import StageMode, StepShape
from trainer.run.stages import final_saes, steps_for

STEP_S, CALIBRATION, EVALUATION, SELECTION = 0.5, 1e-4, 2e-4, 3e-4
BASE = {"load_s": 10.0, "activation_tokens_per_s": 1000.0, "attribution_tokens_per_s": 100.0, "full_forward_tokens_per_s": 400.0}


@pytest.fixture
def table(tmp_path, monkeypatch):
    config = parse_config(["--dictionary.d_in", "576"])
    sae = [
        {"d_in": 576, "num_latents": 4096, "k": k, "batch_size": 1024, "step_s": STEP_S, "calibration_s_per_token": CALIBRATION,
         "evaluation_s_per_token": EVALUATION, "selection_s_per_token": SELECTION}
        for k in (16, 32, 64)
    ]  # fmt: skip
    path = tmp_path / "throughputs.json"
    path.write_text(json.dumps({"test-kind": {"measured": "now", "base_model": {base_model_key(config): BASE}, "sae": sae}}))
    monkeypatch.setattr(dry_run, "THROUGHPUTS_FILE", path)
    return config


def stage_seconds(plan: str, stage: str) -> float:
    times = plan.split("wall time")[1]
    line = next(line for line in times.splitlines() if line.strip().startswith(stage))
    return float(line.split()[-2].replace(",", ""))


def test_wall_time_per_stage_follows_the_measured_throughputs(table):
    config = parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind"])
    plan = describe_plan(config)
    steps = steps_for(config.cycles.tokens_per_cycle, config)
    per_sae = steps * STEP_S + config.optimizer.calibration_tokens * CALIBRATION
    assert stage_seconds(plan, "cycle training") == pytest.approx(4 * per_sae, abs=1)  # cycle 0 + 3 cycles
    assert stage_seconds(plan, "transfer training") == pytest.approx(len(final_saes(config)) * per_sae, abs=1)
    context = config.data.context_length
    harvest = (
        BASE["load_s"] + 800 * context / 1000 + 64 * context / 100 + 256 * context / 1000 + 2 * 16 * context / 400
    )  # 800 training, 64 attribution, 256 held-out and 16 spliced-loss contexts of the default
    assert stage_seconds(plan, "harvest") == pytest.approx(harvest, abs=1)
    assert "2 passes: activations cached once" in plan


def test_processes_share_the_cache_and_the_batch(table):
    """The batch is global: 8 processes at 8x the batch take the measured per-process step 8x less often."""
    one = describe_plan(parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind"]))
    eight = describe_plan(
        parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind", "--plan.num_processes", "8", "--cycles.batch_size", "8192"])
    )
    assert "DMSAE distillation plan (8 process(es)" in eight
    assert "8,192 tokens per optimisation step, all processes together: 1 micro-batch(es) of 1,024 tokens per process" in eight
    assert "400 steps (409,600 tokens, 409,600 per process) each" in one and "50 steps (409,600 tokens, 51,200 per process) each" in eight
    assert stage_seconds(eight, "cycle training") < stage_seconds(one, "cycle training") / 4
    assert "0.1 GB per process" in one and "0.0 GB per process" in eight


def test_the_same_batch_on_more_processes_is_the_same_steps(table):
    """The plan's steps do not depend on the processes; each one's micro-batch does (DDP), and so its
    memory; latent-parallel, each process holds the whole micro-batch and its share of the latents."""
    one = describe_plan(parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind"]))
    two = describe_plan(parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind", "--plan.num_processes", "2"]))
    two_ddp = describe_plan(
        parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind", "--plan.num_processes", "2", "--run.parallelism", "ddp"])
    )
    assert "400 steps (409,600 tokens, 204,800 per process) each" in two
    assert "ddp: one whole SAE, 512 tokens" in two_ddp and "ddp: one whole SAE, 1,024 tokens" in one
    assert "latent-parallel: 1/2 of the latents, 1,024 tokens" in two


def test_unmeasured_kinds_and_shapes_are_not_guessed(table):
    plan = describe_plan(parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "never-measured"]))
    assert "not estimated: no throughputs measured on never-measured" in plan
    far = describe_plan(parse_config(["--dictionary.d_in", "2304", "--dictionary.num_latents", "65536", "--plan.device_kind", "test-kind"]))
    assert "SAE training      not estimated" in far and "cycle training" not in far.split("wall time")[1]


def test_streaming_reruns_the_base_model_per_sae(table):
    config = parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "test-kind", "--run.stream_activations", "true"])
    saes = 4 + len(final_saes(config))
    assert f"{saes + 2} passes: activations streamed for every SAE" in describe_plan(config)


# ---- modes, bytes per step and the estimate from published rates ------------------------------

PAPER = str(Path(__file__).resolve().parent.parent / "trainer" / "configs" / "paper_gemma2_l12.yaml")


def hours(line: str) -> float:
    value, unit = line.split()[-2:]
    return float(value.replace(",", "")) * {"h": 3600, "s": 1}[unit] / 3600


def test_paper_plan_on_8_h100_names_each_stage_mode_bytes_and_both_totals():
    config = parse_config(["--config", PAPER, "--plan.num_processes", "8", "--plan.device_kind", "cuda-nvidia-h100-80gb-hbm3"])
    plan = describe_plan(config, 2304, model_config_read=False)
    times = plan.split("wall time")[1]
    assert "estimated from specifications of cuda-nvidia-h100-80gb-hbm3" in times
    lines = {line.split()[0] + " " + line.split()[1]: line for line in times.split("plain DDP")[0].splitlines()[1:] if len(line.split()) > 2}
    assert "latent-parallel" in lines["cycle training"] and "MB/step" in lines["cycle training"]
    assert "sae-parallel" in lines["transfer training"] and "MB/step" in lines["transfer training"]
    assert times.count("rests on:") == 5 + 2  # every stage of the run, and the two training stages of plain DDP
    total = next(line for line in times.splitlines() if line.strip().startswith("total"))
    today = next(line for line in times.splitlines() if line.strip().startswith("plain DDP"))
    assert hours(total.split(" on the node")[0]) <= 6  # the paper's run on one 8-GPU node
    assert hours(today.split(" on the node")[0]) >= 15  # every SAE stage DDP, fp32, from disk
    assert "ddp" in times.split("plain DDP")[1] and "2,115.35 MB/step" in times.split("plain DDP")[1]


def test_plan_bytes_formulas_agree_with_hand_computed_values():
    """d = 4, K = 16, N = 8 tokens, P = 2, 2 groups, aux_k = 2, bf16 storage, fp32 compute."""
    shape = StepShape(d_in=4, num_latents=16, tokens=8, processes=2, groups=2, aux_k=2)
    # 2 (P - 1) / P = 1: an all-reduce sends its size; an all-gather half its result.
    gradients = 4 * (16 * 4 + 16 * 4 + 16 + 4)  # encoder rows, W_dec, b_enc, b_dec (fp32)
    batch_topk = 4 * 256 * 8 + (8 + 4 + 8 + 8 + 2 * 8)  # 4 histograms; budget, bound, candidates, above, ties
    dead = 17 * 8
    assert parallelism.ddp_bytes(shape) == gradients + batch_topk + dead + (5 * 4 + 4)  # + AuxK's variance
    gather = 8 * 4 * 2 / 2
    prefixes, b_dec_gradient, norm, statistics = 2 * 8 * 4 * 4, 4 * 4, 4, 2 * 4 + 4 + 8  # L0s, dead fraction, dead total
    auxk = 2 * 8 * 2 * 4 / 2 + 8 * 4 * 4 + b_dec_gradient  # top values of both processes, reconstruction, b_dec again
    latent = gather + prefixes + batch_topk + b_dec_gradient + norm + statistics + auxk
    assert parallelism.latent_parallel_bytes(shape) == latent
    assert parallelism.sae_parallel_bytes(shape) == gather
    assert parallelism.bytes_per_step(StageMode.SAE_PARALLEL, shape._replace(processes=1)) == 0


def test_plan_for_a_kind_never_measured_is_estimated_from_specifications(tmp_path, monkeypatch):
    path = tmp_path / "throughputs.json"
    specifications = {"bf16_flops_per_s": 1e14, "tf32_flops_per_s": 5e13, "fp32_flops_per_s": 1e13, "memory_bytes_per_s": 1e12,
                      "link_bytes_per_s": 1e11, "sources": ["a datasheet, https://example.org"]}  # fmt: skip
    path.write_text(json.dumps({"spec-kind": {"specifications": specifications}}))
    monkeypatch.setattr(dry_run, "THROUGHPUTS_FILE", path)
    plan = describe_plan(parse_config(["--dictionary.d_in", "576", "--plan.device_kind", "spec-kind", "--plan.num_processes", "2"]))
    assert "estimated from specifications of spec-kind" in plan and "source: a datasheet, https://example.org" in plan
    assert "harvest           not estimated" in plan  # the embedded model's size is not in the cost model


def test_plan_deals_the_final_saes_evenly_pairing_the_largest_k_with_the_smallest():
    """SAE-parallel: the transfer's SAEs (the paper's 14) dealt to 8 processes, each once; every
    process gets one or two, and an SAE at k = 640 shares its process with none."""
    ks = [final.k for final in final_saes(parse_config(["--config", "trainer/configs/paper_gemma2_l12.yaml"]))]
    dealt = parallelism.deal(ks, 8)
    assert sorted(index for indices in dealt for index in indices) == list(range(len(ks)))
    assert {len(indices) for indices in dealt} == {1, 2}
    loads = [sum(ks[index] for index in indices) for indices in dealt]
    assert max(loads) == max(ks), loads  # round-robin would put both k = 640 SAEs on one process (1,280)
    assert all(indices == sorted(indices) for indices in dealt), "each process trains its SAEs in training order"


def test_plan_memory_follows_each_stage_mode():
    plan = describe_plan(parse_config(["--config", "trainer/configs/paper_gemma2_l12.yaml", "--plan.num_processes", "8"]))
    memory = next(line for line in plan.splitlines() if line.strip().startswith("memory"))
    assert "cycles ~0.95 GiB (latent-parallel: 1/8 of the latents, 2,048 tokens)" in memory, memory
    assert "transfer ~11.53 GiB (sae-parallel: up to 2 whole SAE(s), 2,048 tokens)" in memory, memory


def test_plan_trains_the_final_saes_latent_parallel_when_too_few_to_deal():
    """14 final SAEs: dealt to 8 processes (SAE-parallel); on 16, dealing would idle two, so each is
    latent-parallel; --run.parallelism ddp forces DDP everywhere."""
    paper = ["--config", "trainer/configs/paper_gemma2_l12.yaml"]
    assert parallelism.transfer_mode(parse_config(paper), 8) is StageMode.SAE_PARALLEL
    assert parallelism.transfer_mode(parse_config(paper), 16) is StageMode.LATENT_PARALLEL
    assert parallelism.transfer_mode(parse_config([*paper, "--run.parallelism", "ddp"]), 8) is StageMode.DDP
    assert parallelism.cycle_mode(parse_config(paper), 1) is StageMode.DDP  # one process: plain training
    plan = describe_plan(parse_config([*paper, "--plan.num_processes", "16", "--cycles.data_lanes", "16"]))
    assert "transfer training latent-parallel" in plan
