"""How the processes of a launch share each SAE stage: the one place the mode of a stage is
decided. The pipeline runs the mode chosen here and the dry run prints it.

- ``DDP``: every process holds the whole SAE and a 1/P slice of the global batch; the gradients
  are all-reduced (the only mode on one process, where it is plain training).
- ``LATENT_PARALLEL``: every process holds K/P of the latents (their encoder rows, decoder rows,
  biases and Adam state; b_dec replicated) and the whole global batch; BatchTopK, the Matryoshka
  prefixes and AuxK are taken across the shards (``trainer.sae.latent_parallel``).
- ``SAE_PARALLEL``: the stage's independent SAEs are dealt to the processes; each trains whole
  SAEs on the whole global batch, with no gradient all-reduce.
"""

from __future__ import annotations

from enum import Enum

from trainer.config import DistillConfig


class StageMode(str, Enum):
    DDP = "ddp"
    LATENT_PARALLEL = "latent-parallel"
    SAE_PARALLEL = "sae-parallel"


def cycle_mode(config: DistillConfig, processes: int) -> StageMode:
    """A distillation cycle is one SAE: its latents are sharded over the processes."""
    if processes > 1 and config.run.parallelism == "auto":
        return StageMode.LATENT_PARALLEL
    return StageMode.DDP


def transfer_mode(config: DistillConfig, processes: int) -> StageMode:
    """The final SAEs are independent given C*: dealt to the processes."""
    if processes > 1 and config.run.parallelism == "auto":
        return StageMode.SAE_PARALLEL
    return StageMode.DDP
