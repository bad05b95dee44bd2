"""Worker run by tests/test_ddp.py under `accelerate launch` with two CPU processes (gloo).

    python ddp_worker.py replicas            train one DMSAE, check the replicas and the frozen core
    python ddp_worker.py global-batch OUT [MODE [CHECKPOINT]]
                                             train one DMSAE on a fixed stream of global batches, each
                                             process on its slice (MODE ddp, the default) or on all of
                                             it (latent-parallel), either in bf16 with a -bf16 suffix;
                                             save the result to OUT (any world
                                             size); with CHECKPOINT, stop halfway and checkpoint there
    python ddp_worker.py killed-after-checkpoint STAGE ARGS...
                                             run trainer/distill.py's main with ARGS, stopping both
                                             processes after STAGE's first latent-parallel checkpoint
    python ddp_worker.py resume-global-batch OUT CHECKPOINT
                                             continue such a checkpoint with the single-process trainer
    python ddp_worker.py distill ARGS...     run trainer/distill.py's main with ARGS, the second process
                                             arriving late at the distilled core (a race to cover)
    python ddp_worker.py fail-on-main FILE ARGS...
                                             run trainer/distill.py as the command line does, the main
                                             process failing in cycle 0's evaluation (work it does alone);
                                             the time of the failure goes to FILE
    python ddp_worker.py global-stream DATASET CACHE OUT
                                             read the global micro-batches of the cache in CACHE and of a
                                             stream of DATASET (bfloat16), from the start and resumed at
                                             STREAM_RESUME; save them to OUT.<process index>
    python ddp_worker.py count-tokenised FOLDER ARGS...
                                             run trainer/distill.py's main with ARGS, recording every text
                                             the tokenizer is given to FOLDER/tokenised.<process index>.json
    python ddp_worker.py main-only-phase TIMEOUT_S SLEEP_S FILE RUN_DIR
                                             the report phase with --run.process_group_timeout_s TIMEOUT_S,
                                             the main process writing the report for SLEEP_S seconds
                                             while the other waits; the time it began goes to FILE
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer import distill
from trainer.config import OptimizerConfig
from trainer.run.stages import BatchShape
from trainer.sae.latent_parallel import LatentParallelTrainer
from trainer.sae.training import SAETrainer


def train_two_replicas() -> Accelerator:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    torch.manual_seed(0)  # the same initialisation on both processes
    config = DMSAEConfig(
        d_in=16, num_latents=128, core_size=8, group_sizes=[8, 32, 80], k=4, hook_module="model.layers.1", dead_tokens_threshold=512
    )
    model = DMSAEModel(config)
    core = model.core_encoder.clone()
    trainer = SAETrainer(model, OptimizerConfig(lr=3e-3, warmup_steps=2), total_steps=25, accelerator=accelerator)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # each process its own data
    for _ in range(25):
        trainer.step(torch.randn(64, 16, generator=generator))
    sae = trainer.calibrate_threshold([torch.randn(64, 16, generator=generator) for _ in range(4)])
    assert torch.equal(sae.core_encoder, core), "frozen core rows changed"
    assert not torch.equal(sae.b_dec, torch.zeros(16)), "training did not happen"
    state = torch.cat(
        [t.flatten().float() for t in sae.state_dict().values()] + [trainer.tokens_since_fired.float(), torch.tensor([sae.config.threshold])]
    )
    replicas = accelerator.gather(state[None])
    assert torch.equal(replicas[0], replicas[1]), "replicas diverged"
    accelerator.print("replicas identical")
    return accelerator


GLOBAL_BATCH, GLOBAL_STEPS = 128, 30


def global_batch_setup(latent_parallel: bool = False, mixed_precision: str = "no") -> tuple[Accelerator, SAETrainer, Callable[[], torch.Tensor]]:
    """A tiny SAE with a core (its groups spanning the shards of 2 processes, dead latents for AuxK),
    its trainer, and the stream of the same global batches of GLOBAL_BATCH tokens whatever the
    number of processes: under DDP each process takes its contiguous slice (rank order), so 1 x 128
    and 2 x 64 see the same data; latent-parallel, each takes the whole batch."""
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=16, num_latents=512, core_size=8, group_sizes=[8, 64, 432], k=2, hook_module="model.layers.1",
        dead_tokens_threshold=256, aux_k=8,
    )  # fmt: skip
    model = DMSAEModel(config)
    model.core_encoder.copy_(torch.randn(8, 16))  # a core that fires: its columns are kept unmasked
    trainer_class = LatentParallelTrainer if latent_parallel else SAETrainer
    trainer = trainer_class(model, OptimizerConfig(lr=3e-3, warmup_steps=2), GLOBAL_STEPS, accelerator)
    generator = torch.Generator().manual_seed(7)
    share = GLOBAL_BATCH if latent_parallel else GLOBAL_BATCH // accelerator.num_processes
    first = 0 if latent_parallel else accelerator.process_index * share

    def my_slice() -> torch.Tensor:
        # Offset features make b_dec matter; a heavy tail makes BatchTopK's cut non-trivial.
        batch = torch.randn(GLOBAL_BATCH, 16, generator=generator) ** 3 + torch.arange(16) / 4
        return batch[first : first + share]

    return accelerator, trainer, my_slice


def train_on_global_batches(output: str, mode: str = "ddp", checkpoint: str | None = None) -> Accelerator:
    """Train GLOBAL_STEPS steps (``mode`` ddp or latent-parallel, either with a -bf16 suffix: in
    bf16) and save the SAE, its losses and counts to OUT. With ``checkpoint``: stop after half the
    steps, writing a training checkpoint there."""
    mode, bf16 = mode.removesuffix("-bf16"), mode.endswith("-bf16")
    accelerator, trainer, my_slice = global_batch_setup(mode == "latent-parallel", "bf16" if bf16 else "no")
    stop_at = GLOBAL_STEPS // 2 if checkpoint else GLOBAL_STEPS
    losses, aux_losses = [], []
    for step in range(GLOBAL_STEPS):
        batch = my_slice()  # drawn every step, so a resumed run skips the same batches
        if step < trainer.steps_taken:
            continue
        if step == stop_at:
            trainer.save_checkpoint(Path(checkpoint))
            accelerator.print("checkpoint written")
            return accelerator
        stats = trainer.step(batch)
        losses.append(accelerator.reduce(stats.loss.reshape(1), "mean"))
        aux_losses.append(accelerator.reduce(stats.aux_loss.reshape(1), "mean"))
    trainer.calibrate_threshold([my_slice() for _ in range(3)])
    sae = trainer.release()
    # Latent-parallel, each process counts its own latents (equal ranges here: concatenated in order).
    tokens_since_fired = accelerator.gather(trainer.tokens_since_fired) if mode == "latent-parallel" else trainer.tokens_since_fired
    if accelerator.is_main_process:
        torch.save(
            {
                "state": {name: tensor.clone() for name, tensor in sae.state_dict().items()},
                "tokens_since_fired": tokens_since_fired.clone(),
                "threshold": torch.tensor(sae.config.threshold),
                "losses": torch.cat(losses),
                "aux_losses": torch.cat(aux_losses),
            },
            output,
        )
    accelerator.print("global batches trained")
    return accelerator


def resume_on_global_batches(output: str, checkpoint: str) -> Accelerator:
    """Continue a checkpoint of train_on_global_batches with the DDP/single-process trainer."""
    accelerator, trainer, my_slice = global_batch_setup()
    trainer.load_checkpoint(Path(checkpoint))
    losses = []
    for step in range(GLOBAL_STEPS):
        batch = my_slice()
        if step >= trainer.steps_taken:
            losses.append(trainer.step(batch).loss.reshape(1))
    sae = trainer.calibrate_threshold([my_slice() for _ in range(3)])
    torch.save({"state": {name: tensor.clone() for name, tensor in sae.state_dict().items()}, "losses": torch.cat(losses)}, output)
    accelerator.print("resumed and trained")
    return accelerator


STREAM_SHAPE = BatchShape(batch_size=16, accumulation=1, lanes=4, processes=2)  # process 0: lanes 0 and 2
STREAM_BATCHES, STREAM_RESUME = 24, 13  # past the first epoch of every lane


def gathered_streams(dataset: str, cache: str, output: str) -> Accelerator:
    """Every process's all-gathered micro-batches of a cache and of a stream, read from the start
    and, with the shard row counts every process knew at STREAM_RESUME, resumed there."""
    from itertools import islice

    from accelerate.utils import gather_object
    from test_activations import BASE, CONTEXT_LENGTH, harvest_config
    from test_prefetch import harvest_of
    from tiny_models import tiny_model, tiny_tokenizer

    from trainer.config import DataConfig
    from trainer.harvest.cache import ActivationCache, harvest_activations

    accelerator = Accelerator(cpu=True)
    streamed = harvest_config(Path(output).parent, cache_dir=None, storage_dtype="bfloat16")
    sources = {
        "cached": lambda: ActivationCache(cache),
        "streamed": lambda: harvest_activations(tiny_model(), tiny_tokenizer(), BASE, DataConfig(dataset, context_length=CONTEXT_LENGTH), streamed),
    }
    read = {}
    for name, source in sources.items():
        harvest, rows = harvest_of(source()), {}
        read[name] = []
        for step, batch in enumerate(islice(harvest.global_batches(STREAM_SHAPE, seed=5), STREAM_BATCHES)):
            read[name].append(batch)
            if step + 1 == STREAM_RESUME:  # what a checkpoint here records
                rows = {shard: count for known in gather_object([harvest.harvested_shard_rows()]) for shard, count in known.items()}
        resumed = harvest_of(source())
        resumed.remember_shard_rows(rows)
        read[f"{name} resumed"] = list(islice(resumed.global_batches(STREAM_SHAPE, seed=5, start_step=STREAM_RESUME), STREAM_BATCHES - STREAM_RESUME))
    torch.save(read, f"{output}.{accelerator.process_index}")
    accelerator.print("streams gathered")
    return accelerator


def count_tokenised_texts(patch: Callable[[object, str, object], None], record: Callable[[list[str]], None]) -> None:
    """Make every tokenizer hand each text it is asked to tokenise (a sha1 of it) to ``record``,
    installed with ``patch`` (setattr, or pytest's monkeypatch.setattr). Only the outermost of
    nested calls (__call__ -> batch_encode_plus ...) counts."""
    import hashlib

    from transformers import PreTrainedTokenizerBase

    depth = [0]

    def counted(method):
        def wrapper(self, text=None, *args, **kwargs):
            if depth[0] == 0 and text is not None:
                record([hashlib.sha1(t.encode()).hexdigest() for t in ([text] if isinstance(text, str) else text)])
            depth[0] += 1
            try:
                return method(self, text, *args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for name in ("__call__", "encode", "encode_plus", "batch_encode_plus"):
        if hasattr(PreTrainedTokenizerBase, name):
            patch(PreTrainedTokenizerBase, name, counted(getattr(PreTrainedTokenizerBase, name)))


def counting_tokenised_texts(folder: str) -> None:
    """Write every text this process tokenises (a sha1 each, in order) to
    FOLDER/tokenised.<process index>.json, after each call (a launch killed in teardown keeps it)."""
    import json
    import os

    texts: list[str] = []
    path = Path(folder, f"tokenised.{os.environ.get('RANK', '0')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(hashes: list[str]) -> None:
        texts.extend(hashes)
        path.write_text(json.dumps(texts))

    count_tokenised_texts(setattr, record)


def killed_after_a_checkpoint(stage: str) -> None:
    """Both processes stop right after the first latent-parallel checkpoint of ``stage`` is written,
    as a kill would stop them."""
    from trainer.sae.latent_parallel import LatentParallelTrainer

    save = LatentParallelTrainer.save_checkpoint

    def save_then_stop(self, path: Path, reader_state: dict | None = None) -> None:
        save(self, path, reader_state)
        if path.parent.name == stage:
            raise KeyboardInterrupt(f"killed after the checkpoint of {stage}")

    LatentParallelTrainer.save_checkpoint = save_then_stop


def late_at_the_distilled_core() -> None:
    """Process 1 reaches the distilled core two seconds after process 0, which writes it: a process
    that decided whether to wait by whether the folder exists would skip the barrier and hang both."""
    import time

    from trainer.pipeline import cycles

    save = cycles.save_distilled_core

    def late(run, *args):
        if run.accelerator.process_index == 1:
            time.sleep(2)
        return save(run, *args)

    cycles.save_distilled_core = late


def failing_on_main(record: str) -> None:
    import time
    from pathlib import Path

    from trainer.pipeline import cycles

    def evaluate(run, *args):
        if run.is_main:
            Path(record).write_text(str(time.time()))
            raise RuntimeError("injected failure in a main-only step")
        return {}, None  # what evaluate returns on the other processes

    cycles.evaluate = evaluate


def main_only_phase(timeout_s: str, sleep_s: str, record: str, output: str) -> None:
    """The run's report phase, as distill.main sets up the processes; the report takes SLEEP_S."""
    import time
    from pathlib import Path

    from trainer.config import parse_config
    from trainer.pipeline import run as pipeline_run
    from trainer.pipeline.failures import fail_together
    from trainer.run.layout import RunDirectory

    def slow_report(config, paths) -> str:
        Path(record).write_text(str(time.time()))
        time.sleep(float(sleep_s))
        return "report written"

    pipeline_run.write_report = slow_report
    config = parse_config(["--run.output_dir", output, "--run.log_with", "none", "--run.process_group_timeout_s", timeout_s])
    accelerator = distill.make_accelerator(config)
    with fail_together(accelerator, RunDirectory(output)):
        pipeline_run.DistillationRun(config, accelerator).report()
    distill.shut_down(accelerator)


if __name__ == "__main__":
    if sys.argv[1] == "main-only-phase":
        main_only_phase(*sys.argv[2:6])
    elif sys.argv[1] == "fail-on-main":
        failing_on_main(sys.argv[2])
        sys.exit(distill.cli(sys.argv[3:]))
    elif sys.argv[1] == "replicas":
        distill.shut_down(train_two_replicas())
    elif sys.argv[1] == "global-stream":
        distill.shut_down(gathered_streams(*sys.argv[2:5]))
    elif sys.argv[1] == "global-batch":
        distill.shut_down(train_on_global_batches(*sys.argv[2:]))
    elif sys.argv[1] == "count-tokenised":
        counting_tokenised_texts(sys.argv[2])
        sys.exit(distill.main(sys.argv[3:]))
    elif sys.argv[1] == "killed-after-checkpoint":
        killed_after_a_checkpoint(sys.argv[2])
        sys.exit(distill.main(sys.argv[3:]))
    elif sys.argv[1] == "resume-global-batch":
        distill.shut_down(resume_on_global_batches(*sys.argv[2:]))
    else:
        late_at_the_distilled_core()
        sys.exit(distill.main(sys.argv[2:]))

