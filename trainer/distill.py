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
5. transfer  fresh DMSAEs from C* at every k (Algorithm 3), the baselines and the controls;
6. report    metrics, figures, summary, Hub-ready folders (and the push with --push-to-hub).

Everything that can be checked without the base model's weights is checked before anything is
loaded or written (``trainer.pipeline.checks``). A user's mistake (``trainer.errors.UserError``:
a setting, a run file, the dataset, the Hub) prints one line naming the problem and the fix;
``DMSAE_DEBUG=1`` shows its traceback. Anything else is a bug and shows its traceback.

This entry point only wires the rooms of ``trainer/`` together, and imports them once the
arguments are parsed: ``--help`` needs neither torch nor transformers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: the package's root, not trainer/, is where imports start
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import yaml  # noqa: E402

from trainer.config import DistillConfig, parse_config, take_option  # noqa: E402
from trainer.errors import ConfigError, UserError  # noqa: E402

if TYPE_CHECKING:
    from accelerate import Accelerator


def flat_hyperparameters(config: DistillConfig) -> dict[str, int | float | str | bool]:
    """The configuration as the flat scalar dict trackers (tensorboard's hparams) accept."""
    flat = {}
    for section, fields in yaml.safe_load(config.to_yaml()).items():
        for name, value in fields.items():
            flat[f"{section}.{name}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def shut_down(accelerator) -> None:
    """Finish the trackers and destroy the process group, once every process is done.

    The sleep releases the GIL: gloo's worker thread still has to free the last collectives'
    tensors, which needs the GIL; destroying the group while it waits deadlocks (torch 2.13).
    """
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(0.5)
    accelerator.end_training()


def make_accelerator(config: DistillConfig) -> Accelerator:
    """The run's Accelerator. Its process group waits ``run.process_group_timeout_s`` in every
    collective: the processes wait in a barrier while the main process works alone (the report, the
    Hub push), and NCCL's default timeout (10 minutes) would end the run there."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from trainer.run.layout import RunDirectory

    return Accelerator(
        gradient_accumulation_steps=config.run.gradient_accumulation_steps,
        log_with=None if config.run.log_with == "none" else config.run.log_with,
        project_config=ProjectConfiguration(project_dir=config.run.output_dir, logging_dir=str(RunDirectory(config.run.output_dir).logs)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.process_group_timeout_s))],
    )


def push_only(run_dir: str, argv: list[str]) -> int:
    """``--push-only RUN_DIR``: push a finished (or partly finished) run's artifacts, e.g. after
    a Hub failure. The run's own configuration decides what is pushed; --push-to-hub names the repo."""
    from hub_cards.publish import push_run
    from trainer.run.layout import RunDirectory

    paths = RunDirectory(run_dir)
    config = parse_config(["--config", str(paths.config_file), *argv])
    if not config.hub.repo_id:
        raise ConfigError("--push-only needs the run repository: add --push-to-hub ORG/NAME")
    report = push_run(paths, config.hub)
    print(f"pushed {report.pushed or 'nothing'}; already on the Hub: {report.skipped or 'nothing'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir, argv = take_option(argv, "--push-only")
    if run_dir is not None:
        return push_only(run_dir, argv)
    config = parse_config(argv)
    from trainer.pipeline.checks import check_before_loading

    preflight = check_before_loading(config)
    if config.run.dry_run:
        from trainer.report.dry_run import describe_plan

        print(describe_plan(config, preflight.d_in, preflight.skipped, preflight.model_config_read))
        return 0
    from accelerate.utils import set_seed

    from hub_cards.publish import HubPublisher
    from trainer.pipeline.failures import fail_together
    from trainer.pipeline.run import DistillationRun
    from trainer.run.layout import TRACKER_PROJECT, RunDirectory

    paths = RunDirectory(config.run.output_dir)
    accelerator = make_accelerator(config)
    set_seed(config.run.seed)
    with fail_together(accelerator, paths):
        accelerator.init_trackers(TRACKER_PROJECT, config=flat_hyperparameters(config))
        # The entry point wires the Hub code in: the pipeline only calls the publisher it is handed.
        DistillationRun(config, accelerator, HubPublisher(paths, config.hub)).run()
    shut_down(accelerator)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with a user's mistakes (a mistyped flag included) as one line on stderr, exit status 1;
    DMSAE_DEBUG=1 raises them."""
    try:
        return main(argv)
    except UserError as error:
        if os.environ.get("DMSAE_DEBUG", "") not in ("", "0"):
            raise
        print(f"distill.py: error: {error.one_line()} {error.hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(cli())
