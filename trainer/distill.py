"""Distilled Matryoshka SAEs, end to end (paper, Algorithms 1-3).

    accelerate launch trainer/distill.py [--config FILE] [--section.field VALUE ...]
    python trainer/distill.py            # the embedded default: SmolLM2-135M on Python's docs

Stages, each resumable (``--run.resume true``) and each leaving its artifacts in the run
directory (see the run's SUMMARY.md):

1. harvest   base-model activations (training and held-out) and the (x, g) attribution sample,
             cached once and reused by every cycle;
2. cycle 0   an imported SAEBench / dictionary_learning / SAELens SAE, or one trained with c = 0;
             then select C(0) by attribution (Algorithm 2);
3. cycles    t = 1..T: copy and freeze the selected encoder rows, reinitialise the rest, train,
             select C(t) from core + prefix-0 (Algorithm 1);
4. C*        the latents of cycle T's core that cycle T selects again (Eq. 8);
5. transfer  fresh DMSAEs from C* at every k (Algorithm 3), and the random-core control;
6. report    metrics, figures, summary, Hub-ready folders (and the push with --push-to-hub).

Everything that can be checked without the base model's weights is checked before anything is
loaded or written (see :func:`check_before_loading`). Errors a user can fix (settings, run files)
print one line naming the setting or file and the fix; ``DMSAE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from hub_cards.publish import push_run, resolve_core
from trainer.base_model import hook_layer_index
from trainer.distill_config import ConfigError, DistillConfig, parse_config
from trainer.distill_plan import base_model_width, cycle0_sae_config, describe_plan, final_runs
from trainer.distill_stages import DistillationRun, check_compatible, load_core, read_cycle0_checkpoint
from trainer.run_directory import CorruptRunFileError, RunDirectory
from trainer.text_corpus import load_text_dataset

# Errors a user fixes by changing a setting or a run file: one line, no traceback (DMSAE_DEBUG=1 shows it).
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError, CorruptRunFileError)


def flat_hyperparameters(config: DistillConfig) -> dict[str, int | float | str | bool]:
    """The configuration as the flat scalar dict trackers (tensorboard's hparams) accept."""
    flat = {}
    for section, fields in yaml.safe_load(config.to_yaml()).items():
        for name, value in fields.items():
            flat[f"{section}.{name}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def shut_down(accelerator: Accelerator) -> None:
    """Finish the trackers and destroy the process group, once every process is done.

    The sleep releases the GIL: gloo's worker thread still has to free the last collectives'
    tensors, which needs the GIL; destroying the group while it waits deadlocks (torch 2.13).
    """
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(0.5)
    accelerator.end_training()


def push_only(run_dir: str, argv: list[str]) -> int:
    """``--push-only RUN_DIR``: push a finished (or partly finished) run's artifacts, e.g. after
    a Hub failure. The run's own configuration decides what is pushed; --push-to-hub names the repo."""
    config = parse_config(["--config", str(Path(run_dir) / "run_config.yaml"), *argv])
    if not config.hub.repo_id:
        raise ValueError("--push-only needs the run repository: add --push-to-hub ORG/NAME")
    report = push_run(run_dir, config.hub)
    print(f"pushed {report.pushed or 'nothing'}; already on the Hub: {report.skipped or 'nothing'}")
    return 0


def known_core_size(config: DistillConfig) -> int | None:
    """Size of the core the transfer stage will start from, when it is known before any training."""
    if config.transfer.core:
        return len(load_core(resolve_core(config.transfer.core)).lineage)
    finished = RunDirectory(config.run.output_dir).distilled_core
    return len(load_core(finished).lineage) if config.run.resume and finished.exists() else None


def check_sparsities(config: DistillConfig, d_in: int) -> None:
    """Every k of every stage against K (and the core size when it is known): the DMSAE configs the
    stages will build, built now."""
    K = config.dictionary.num_latents
    try:
        base = cycle0_sae_config(config, d_in, hook_layer_index(config.model.hook_module))
    except ValueError as error:
        raise ConfigError(f"--cycles.k {config.cycles.k} with --dictionary.num_latents {K}: {error}") from None
    core_size = known_core_size(config)
    for run in final_runs(config):
        c = 0 if run.core == "none" else core_size or 0
        try:
            base.with_core([[0, j] for j in range(c)], cycle=1, k=run.k, variant=run.variant)
        except ValueError as error:
            core = f"a core of {c} latents" if core_size is not None or run.core == "none" else "the smallest possible core"
            raise ConfigError(
                f"--transfer.ks {run.k} ({run.name}) is impossible with --dictionary.num_latents {K} and {core}: {error}. "
                "Lower --transfer.ks or raise --dictionary.num_latents"
            ) from None


def check_paths(config: DistillConfig) -> None:
    """The output folder, the cycle-0 checkpoint and the dataset, before anything is loaded."""
    output = Path(config.run.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--run.output_dir {output} is a file, not a folder: choose another --run.output_dir")
    parent = next(p for p in [output, *output.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--run.output_dir {output}: {parent} is not writable: choose another --run.output_dir")
    checkpoint = config.cycles.cycle0_checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise ConfigError(
            f"--cycles.cycle0_checkpoint {checkpoint}: no such file or folder (a SAEBench / dictionary_learning trainer "
            "folder or ae.pt, a SAELens folder, or a DMSAE folder)"
        )
    load_text_dataset(config.data)  # streamed: opens the files (or the Hub id), reads nothing


def check_before_loading(config: DistillConfig) -> int:
    """Everything a dry run checks, every run checks before loading the base model or writing
    anything: returns the activation width d."""
    check_paths(config)
    d_in = config.dictionary.d_in or base_model_width(config)
    check_sparsities(config, d_in)
    if config.cycles.cycle0_checkpoint and not config.transfer.core:
        try:
            sae = read_cycle0_checkpoint(config.cycles.cycle0_checkpoint)
        except (ValueError, KeyError, OSError) as error:
            raise ConfigError(f"--cycles.cycle0_checkpoint {config.cycles.cycle0_checkpoint}: {error}") from None
        check_compatible(sae.config, d_in, hook_layer_index(config.model.hook_module), config)
    return d_in


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--push-only" in argv:
        index = argv.index("--push-only")
        return push_only(argv[index + 1], argv[:index] + argv[index + 2 :])
    config = parse_config(argv)
    d_in = check_before_loading(config)
    if config.run.dry_run:
        print(describe_plan(config, d_in))
        return 0
    accelerator = Accelerator(
        gradient_accumulation_steps=config.run.gradient_accumulation_steps,
        log_with=None if config.run.log_with == "none" else config.run.log_with,
        project_dir=config.run.output_dir,
    )
    set_seed(config.run.seed)
    accelerator.init_trackers("dmsae", config=flat_hyperparameters(config))
    DistillationRun(config, accelerator).run()
    shut_down(accelerator)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with a user's errors as one line on stderr (exit status 1); DMSAE_DEBUG=1 raises them."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        if os.environ.get("DMSAE_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(error).split("\n")) if isinstance(error, ConfigError) else str(error)
        print(f"distill.py: error: {message} [DMSAE_DEBUG=1 shows the traceback]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(cli())
