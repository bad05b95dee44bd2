"""Fault injection on tiny runs: kills at every stage boundary, corrupt and missing run files, NaN
data and weights, bad settings, a moved run folder. Each checks the message the user sees and
that nothing finished was lost; the resumed runs end bitwise identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load, save_file
from test_distill import tiny_args, tiny_setup  # noqa: F401 (a fixture)

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer import distill
from trainer.config import DataConfig
from trainer.errors import ConfigError, CorruptRunFileError
from trainer.harvest.cache import CorruptShardError
from trainer.harvest.text_corpus import load_text_dataset
from trainer.pipeline import cycles
from trainer.pipeline import run as pipeline_run
from trainer.pipeline.context import RunContext
from trainer.run.timings import StageTimer
from trainer.sae.training import NonFiniteTrainingError

RESULT_FILES = ("model.safetensors", "core.json", "core_directions.safetensors")


def fault_args(setup, output: Path | str, *extra: str) -> list[str]:
    """test_distill's tiny run without the baselines and the sparse-core comparison (faster)."""
    return tiny_args(setup, output, "--transfer.baseline", "false", "--transfer.sparsity_matched", "false", *extra)


@pytest.fixture(scope="module")
def reference(tiny_setup, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted run: what every faulted and resumed run must end as."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert distill.main(fault_args(tiny_setup, output)) == 0
    return output


def results(run: Path) -> dict[str, bytes]:
    """Every SAE and core of a run, by path relative to the run."""
    return {
        str(path.relative_to(run)): path.read_bytes()
        for path in sorted(run.rglob("*"))
        if path.name in RESULT_FILES and "hub" not in path.relative_to(run).parts
    }


def copy_run(reference: Path, destination: Path, keep: tuple[str, ...] | None = None) -> Path:
    """A copy of the reference run (only ``keep`` of its top-level entries when given)."""
    shutil.copytree(reference, destination, ignore=None if keep is None else lambda d, names: [n for n in names if d == str(reference) and n not in keep])
    return destination


def resume(setup, output: Path | str, *extra: str) -> int:
    return distill.main(fault_args(setup, output, "--run.resume", "true", *extra))


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a cache shard in place with ``edit`` applied to its rows (same size, same metadata)."""
    with safe_open(path, "pt") as file:
        metadata, x = file.metadata(), file.get_tensor("x")
    save_file({"x": edit(x)}, path, metadata=metadata)


# ---- kills ---------------------------------------------------------------------------------


def test_kill_at_every_stage_boundary_then_resume_gives_the_same_run(tiny_setup, reference, tmp_path, monkeypatch):  # noqa: F811
    """One process per boundary: each dies at the first boundary no earlier process died at."""
    killed: list[str] = []

    def boundary(name: str) -> None:
        if name not in killed:
            killed.append(name)
            raise KeyboardInterrupt(f"killed at {name}")

    def after(function, name_of):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            boundary(name_of(*args))
            return result

        return wrapper

    def before(function, name_of):
        def wrapper(*args, **kwargs):
            boundary(name_of(*args))
            return function(*args, **kwargs)

        return wrapper

    run = pipeline_run.DistillationRun
    monkeypatch.setattr(run, "distilled_core", before(run.distilled_core, lambda *a: "harvest"))  # harvested, no cycle started
    # Before the checkpoint's removal: the stage folder is in place, its checkpoint still there.
    monkeypatch.setattr(RunContext, "finish_stage", before(RunContext.finish_stage, lambda self, stage: f"finish {stage}"))
    monkeypatch.setattr(cycles, "save_distilled_core", after(cycles.save_distilled_core, lambda *a: "distilled core"))
    monkeypatch.setattr(pipeline_run, "write_report", before(pipeline_run.write_report, lambda *a: "report"))
    output = tmp_path / "killed"
    for attempt in range(20):
        try:
            assert distill.main(fault_args(tiny_setup, output, *(["--run.resume", "true"] if attempt else []))) == 0
            break
        except KeyboardInterrupt:
            continue
    assert killed == [
        "harvest", "finish cycle-000", "finish cycle-001", "finish cycle-002", "distilled core",
        "finish transfer-k-0004-dense_core", "finish transfer-k-0016-dense_core", "finish transfer-k-0008-dense_core",
        "finish transfer-random-core-k-0008", "report",
    ]  # fmt: skip
    assert results(output) == results(reference)
    assert not any((output / "checkpoints").glob("*")), "a finished stage's checkpoint folder was left behind"
    assert not list(output.rglob("*.partial"))
    timings = json.loads((output / "timings.json").read_text())
    assert {"harvest", "cycle training", "attribution", "evaluation", "transfer training"} <= set(timings)
    assert timings["restart overhead"] > 0  # 10 restarts reloaded the model and reopened the caches


def test_a_harvest_killed_midway_keeps_the_time_of_its_written_shards(tiny_setup, reference, tmp_path, monkeypatch):  # noqa: F811
    """SIGKILL leaves no chance to write anything: the time of every written shard must be on disk already."""
    written = StageTimer.save

    def killed_after_the_first_shard(self) -> None:
        written(self)
        monkeypatch.undo()
        raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(StageTimer, "save", killed_after_the_first_shard)
    output = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        distill.main(fault_args(tiny_setup, output))
    assert len(list((output / "cache" / "activations").glob("*.safetensors"))) == 1
    before = json.loads((output / "timings.json").read_text())
    assert before["harvest"] > 0
    assert resume(tiny_setup, output) == 0
    assert json.loads((output / "timings.json").read_text())["harvest"] > before["harvest"]
    assert results(output) == results(reference)


# ---- the data ----------------------------------------------------------------------------------


def test_nan_in_a_shard_stops_the_cycle_naming_shard_and_rows(tiny_setup, reference, tmp_path):  # noqa: F811
    run = copy_run(reference, tmp_path / "nan", keep=("cache", "run_config.yaml"))  # killed after the harvest
    shards = sorted((run / "cache" / "activations").glob("shard_*.safetensors"))
    originals = {path: path.read_bytes() for path in shards}

    def poison(x):
        x[5:9] = float("nan")
        x[20, 3] = float("inf")
        return x

    # Poison every shard, see which one cycle 0 reads first, then restore the others: the same
    # state as if only that one had been corrupted.
    for shard in shards:
        rewrite_shard(shard, poison)
    with pytest.raises(CorruptShardError) as error:
        resume(tiny_setup, run)
    message = str(error.value)
    (bad,) = [shard for shard in shards if f"cache shard {shard} holds NaN/Inf" in message]
    assert message.startswith("stage cycle-000, step 0: ")
    assert "5 rows (5, 6, 7, 8, 20)" in message and "delete that file and rerun with --run.resume true" in message
    assert not (run / "cycles").exists() and not list((run / "checkpoints").rglob("checkpoint.pt")), "nothing trained on NaN is kept"
    for shard in shards:
        if shard != bad:
            shard.write_bytes(originals[shard])

    # The fix the message gives: only that shard is harvested again; a stage not yet started may change.
    bad.unlink()
    assert resume(tiny_setup, run, "--transfer.tokens", "1024") == 0
    assert all(torch.equal(load(shard.read_bytes())["x"], load(originals[shard])["x"]) for shard in shards)
    ours, theirs = results(run), results(reference)
    assert all(ours[name] == theirs[name] for name in theirs if name.startswith(("cycles", "distilled_core")))
    assert yaml.safe_load((run / "run_config.yaml").read_text())["transfer"]["tokens"] == 1024


def test_truncated_shard_is_named_before_anything_trains(tiny_setup, reference, tmp_path):  # noqa: F811
    run = copy_run(reference, tmp_path / "truncated")
    before = results(run)
    shard = run / "cache" / "activations" / "shard_000003.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(CorruptShardError, match=rf"{shard} has \d+ bytes, the harvest wrote {len(original)}.*delete that file"):
        resume(tiny_setup, run)
    assert results(run) == before
    shard.unlink()
    assert resume(tiny_setup, run) == 0
    assert torch.equal(load(shard.read_bytes())["x"], load(original)["x"])  # the harvest is deterministic: the same rows again
    assert results(run) == before  # nothing finished was redone


def test_shards_get_normal_permissions(reference):
    umask = os.umask(0)
    os.umask(umask)
    for shard in (reference / "cache").rglob("shard_*.safetensors"):
        assert shard.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_shard_written_over_with_garbage_is_named(tmp_path, reference):
    from trainer.harvest.cache import read_shard

    shard = tmp_path / "shard_000000.safetensors"
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptShardError, match=rf"cache shard {shard} is unreadable .*delete that file"):
        read_shard(shard)


# ---- training ------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_setup, reference, tmp_path, monkeypatch):  # noqa: F811
    run = copy_run(reference, tmp_path / "diverged", keep=("cache", "run_config.yaml"))
    forward, calls = DMSAEModel.forward, {"n": 0}

    def diverging(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # step 4 of cycle 0: after the checkpoint of step 3
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(DMSAEModel, "forward", diverging)
    with pytest.raises(NonFiniteTrainingError) as error:
        resume(tiny_setup, run)
    checkpoint = run / "checkpoints" / "cycle-000" / "checkpoint.pt"
    message = str(error.value)
    assert message.startswith("stage cycle-000, step 4: non-finite loss nan") and f"the last good checkpoint {checkpoint} is kept" in message
    assert "--optimizer.lr" in message
    state = torch.load(checkpoint, weights_only=True)
    assert state["steps_taken"] == 3 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "cycles").exists()


def test_a_nan_sae_is_never_imported(tiny_setup, tmp_path):  # noqa: F811
    sae = DMSAEModel(DMSAEConfig(d_in=32, num_latents=256, group_sizes=[8, 248], k=8, hook_module="model.layers.2"))
    sae.W_dec.data[3, 1] = float("nan")
    sae.save_pretrained(tmp_path / "nan-sae")
    args = fault_args(tiny_setup, tmp_path / "run", "--cycles.cycle0_checkpoint", str(tmp_path / "nan-sae"))
    with pytest.raises(FloatingPointError, match="holds NaN/Inf in W_dec"):
        distill.main(args)
    assert not (tmp_path / "run").exists()


# ---- run files -----------------------------------------------------------------------------------


def test_garbage_checkpoint_is_named_without_suggesting_an_unsafe_load(tiny_setup, reference, tmp_path):  # noqa: F811
    run = copy_run(reference, tmp_path / "garbage")
    shutil.rmtree(run / "transfer" / "k-0016-dense_core")
    checkpoint = run / "checkpoints" / "transfer-k-0016-dense_core" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint at all" * 10)
    before = results(run)
    with pytest.raises(CorruptRunFileError) as error:
        resume(tiny_setup, run)
    message = str(error.value)
    assert f"training checkpoint {checkpoint} is unreadable" in message and "delete it and rerun with --run.resume true" in message
    assert "weights_only" not in message and error.value.__cause__ is None
    assert results(run) == before
    checkpoint.unlink()
    assert resume(tiny_setup, run) == 0
    assert results(run) == results(reference)


def test_missing_core_json_names_the_folder_to_delete(tiny_setup, reference, tmp_path):  # noqa: F811
    run = copy_run(reference, tmp_path / "no-core")
    (run / "cycles" / "cycle-001" / "core.json").unlink()
    with pytest.raises(CorruptRunFileError, match=r"cycle-001 is incomplete \(core.json missing\): delete .*cycle-001 and rerun"):
        resume(tiny_setup, run)
    assert (run / "cycles" / "cycle-002" / "model.safetensors").exists()
    shutil.rmtree(run / "cycles" / "cycle-001")
    assert resume(tiny_setup, run) == 0
    assert results(run) == results(reference)


def test_a_moved_run_folder_resumes(tiny_setup, reference, tmp_path, monkeypatch):  # noqa: F811
    run = copy_run(reference, tmp_path / "old-place")
    shutil.rmtree(run / "transfer" / "random-core-k-0008")
    moved = tmp_path / "new-place" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    monkeypatch.chdir(moved.parent)
    assert resume(tiny_setup, "run/") == 0  # relative, with a trailing slash
    assert results(moved) == results(reference)


# ---- settings ----------------------------------------------------------------------------------


def test_transfer_k_too_large_is_refused_before_anything_is_loaded_or_written(tiny_setup, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "run"
    assert distill.cli(fault_args(tiny_setup, output, "--transfer.ks", "4", "5000")) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "--transfer.ks 5000" in error and "Lower --transfer.ks or raise --dictionary.num_latents" in error
    assert not output.exists()


def test_transfer_k_is_checked_against_the_known_core_size(tiny_setup, reference, tmp_path):  # noqa: F811
    run = copy_run(reference, tmp_path / "known-core")
    core_size = len(json.loads((run / "distilled_core" / "core.json").read_text())["selected"])
    before = results(run)
    with pytest.raises(ConfigError, match=rf"--transfer.ks 255 .* a core of {core_size} latents"):
        resume(tiny_setup, run, "--transfer.ks", "255")  # fine without a core, too large beside this one
    assert results(run) == before


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--cycles.k", "5000"], "--cycles.k 5000 with --dictionary.num_latents 256"),
        (["--cycles.cycle0_checkpoint", "no/such/sae"], "--cycles.cycle0_checkpoint no/such/sae: no such file or folder"),
        (["--data.dataset", "no/such/corpus.jsonl"], "--data.dataset 'no/such/corpus.jsonl': no such file"),
        (["--cycles.tau", "1.5"], "--cycles.tau 1.5: must be in (0, 1]"),
        (["--transfer.ks", "0"], "--transfer.ks 0: must be positive integers"),
        (["--run.process_group_timeout_s", "0"], "--run.process_group_timeout_s 0.0: must be positive"),
        (["--run.prefetch_batches", "-1"], "--run.prefetch_batches -1: must be >= 0"),
    ],
)
def test_config_errors_are_one_line_before_anything_is_written(tiny_setup, tmp_path, capsys, monkeypatch, override, expected):  # noqa: F811
    output = tmp_path / "run"
    assert distill.cli(fault_args(tiny_setup, output, *override)) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error and "Traceback" not in error
    assert not output.exists()
    monkeypatch.setenv("DMSAE_DEBUG", "1")
    with pytest.raises(ValueError if "dataset" not in expected else FileNotFoundError):
        distill.cli(fault_args(tiny_setup, output, *override))


def test_a_resume_refuses_changes_to_finished_work(tiny_setup, reference, tmp_path):  # noqa: F811
    """A run killed after its harvest may change what no finished work depends on (see the NaN test), not the rest."""
    run = copy_run(reference, tmp_path / "late", keep=("cache", "run_config.yaml"))
    with pytest.raises(ValueError, match=r"finished work \(harvest\) depends on changed settings:\n  harvest.train_tokens"):
        resume(tiny_setup, run, "--harvest.train_tokens", "16384")


def test_a_bare_dataset_name_out_of_reach_is_reported_as_such(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"--data.dataset 'no_such_corpus' is neither a local path .* nor reachable on the Hub"):
        load_text_dataset(DataConfig(dataset="no_such_corpus"))


# ---- the resume rules, without running -------------------------------------------------------------


def test_resume_rules(tiny_setup, reference, tmp_path, caplog):  # noqa: F811
    """What a resume may change: anything while no work started, what no started work depends on,
    the run folder's own path; local paths are compared resolved."""
    from trainer.config import parse_config
    from trainer.run.layout import RunDirectory
    from trainer.run.resume import start_run

    def config(output, *extra):
        return parse_config(fault_args(tiny_setup, output, *extra))

    failed_early = copy_run(reference, tmp_path / "failed-early", keep=("run_config.yaml",))
    start_run(RunDirectory(failed_early), config(failed_early, "--cycles.k", "12"))  # nothing started: taken over, no --resume needed
    assert yaml.safe_load((failed_early / "run_config.yaml").read_text())["cycles"]["k"] == 12

    harvested = copy_run(reference, tmp_path / "harvested", keep=("cache", "run_config.yaml"))
    start_run(RunDirectory(harvested), config(harvested, "--run.resume", "true", "--cycles.k", "12", "--data.dataset", f"{tiny_setup['corpus'].parent}/./{tiny_setup['corpus'].name}"))
    assert "cycles.k: 8 -> 12" in caplog.text and "data.dataset" not in caplog.text  # the same file, spelled otherwise
    with pytest.raises(FileExistsError, match="--run.resume true"):
        start_run(RunDirectory(harvested), config(harvested))
    with pytest.raises(ValueError, match=r"finished work \(harvest\) depends on changed settings:\n  data.context_length: 32 -> 16"):
        start_run(RunDirectory(harvested), config(harvested, "--run.resume", "true", "--data.context_length", "16"))

    finished = copy_run(reference, tmp_path / "finished")
    with pytest.raises(ValueError, match=r"  optimizer.lr: 0.003 -> 0.001\n.*--harvest.cache_dir .*/finished/cache"):
        start_run(RunDirectory(finished), config(finished, "--run.resume", "true", "--optimizer.lr", "0.001"))
    start_run(RunDirectory(finished), config(finished, "--run.resume", "true", "--transfer.ks", "4", "16", "32", "--hub.license", "mit"))
    # How the processes wait and read: nothing computed depends on it.
    start_run(RunDirectory(finished), config(finished, "--run.resume", "true", "--run.process_group_timeout_s", "60", "--run.prefetch_batches", "0"))


def test_a_damaged_finished_cycle_names_the_folder_to_delete(tiny_setup, reference, tmp_path):  # noqa: F811
    run = copy_run(reference, tmp_path / "damaged")
    weights = run / "cycles" / "cycle-002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptRunFileError, match=rf"{run / 'cycles' / 'cycle-002'} is unreadable .*: delete .*cycle-002 and rerun"):
        resume(tiny_setup, run)
    assert (run / "cycles" / "cycle-001" / "model.safetensors").exists()
