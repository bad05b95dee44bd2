"""Configuration of a Distilled Matryoshka Sparse Autoencoder (DMSAE).

Only the configuration lives here; the maths is in ``modeling_dmsae.py``.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Sequence

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4 spells it PretrainedConfig (trust_remote_code runs this file there too)
    from transformers import PretrainedConfig as PreTrainedConfig

VARIANTS = ("dense_core", "sparse_core")

# SAEBench's Matryoshka group fractions; the last group takes the remainder.
SAEBENCH_GROUP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32)


def matryoshka_group_sizes(num_latents: int, fractions: Sequence[float] = SAEBENCH_GROUP_FRACTIONS) -> list[int]:
    """Group sizes as dictionary_learning computes them: int(f * n) for every group but the
    last, which takes the remainder (for n = 65536: [2048, 4096, 8192, 16384, 34816])."""
    if not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"group fractions must sum to 1, got {list(fractions)} (sum {sum(fractions)})")
    sizes = [int(f * num_latents) for f in fractions[:-1]]
    return sizes + [num_latents - sum(sizes)]


def round_half_up(value: float) -> int:
    """Eq. 4's ``round``: half-way cases go up (Python's round() would send 2.5 to 2)."""
    return math.floor(value + 0.5)


def noncore_k(k: int, num_latents: int, core_size: int) -> int:
    """Eq. 4: k_noncore = round(k * (K - c) / K), the dense-core BatchTopK budget."""
    return round_half_up(k * (num_latents - core_size) / num_latents)


def largest_core(group_sizes: Sequence[int], core_size: int) -> int:
    """The largest core a dictionary of these groups (beside a core of ``core_size``) can take at
    fixed K: the last group absorbs the change and keeps at least one latent."""
    return group_sizes[-1] + core_size - 1


def regroup_for_core(group_sizes: Sequence[int], old_core_size: int, new_core_size: int) -> list[int]:
    """Group sizes when the core changes size at fixed K: the last group absorbs the change
    (as SAEBench's last group takes the remainder)."""
    last = group_sizes[-1] + old_core_size - new_core_size
    if new_core_size > largest_core(group_sizes, old_core_size):
        raise ValueError(
            f"a core of {new_core_size} latents leaves the last Matryoshka group with {last} latents; "
            "grow num_latents or select fewer core latents"
        )
    return [*group_sizes[:-1], last]


def transformer_lens_hook_name(hook_layer: int) -> str:
    """SAEBench / TransformerLens name of a decoder layer's output."""
    return f"blocks.{hook_layer}.hook_resid_post"


class DMSAEConfig(PreTrainedConfig):
    r"""Configuration of a :class:`DMSAEModel`.

    Latents ``0..core_size-1`` are the frozen core; the non-core latents follow, split into
    Matryoshka groups whose sizes sum to ``num_latents - core_size``. The defaults are the
    paper's cycle-0 setting (Gemma-2-2B layer 12, 65k latents, k = 320, no core).

    Args:
        d_in: width d of the activations the SAE reads.
        num_latents: dictionary size K.
        core_size: core size c (0 for cycle 0 or a plain Matryoshka SAE).
        group_sizes: non-core Matryoshka group sizes; they sum to K - c. Default: SAEBench's
            fractions of K - c.
        k: sparsity target. Dense core: BatchTopK keeps ``k_noncore = round(k (K-c)/K)`` non-core
            latents per token (Eq. 4). Sparse core: BatchTopK keeps k over all K latents.
        variant: ``"dense_core"`` (main) or ``"sparse_core"`` (ablation).
        aux_k: number of dead latents AuxK reconstructs the residual with; default d/2.
        aux_alpha: AuxK loss coefficient (dictionary_learning: 1/32).
        dead_tokens_threshold: a latent is dead after this many tokens without firing.
        normalization_factor: activations are divided by this before encoding and the
            reconstruction multiplied by it (dictionary_learning's sqrt(E||x||^2)).
        threshold: inference threshold on (normalised) pre-activations, estimated during
            training; -1 means "not estimated yet".
        base_model_id: the model the activations come from (a Hub id where there is one).
        base_model_file: the file of that model whose weights were read, when not its default
            weights (e.g. a GGUF file and where it came from); None otherwise.
        hook_module: module path whose output is read, e.g. ``model.layers.12``.
        hook_layer: layer index of that module.
        hook_name: TransformerLens name for SAEBench, e.g. ``blocks.12.hook_resid_post``.
        mask_bos: BOS positions (a BOS token first in its context) were left out of training, so
            a splice (``DMSAEModel.splice``) leaves them untouched (the trainer records its
            ``data.mask_bos``).
        max_norm_ratio: positions whose activation norm exceeds this multiple of the median norm
            of their batch were left out of training (0: none), and a splice leaves them untouched
            (the trainer records its ``harvest.max_norm_ratio``). The defaults of these two are the
            trainer's, which configurations saved before the fields existed were trained with.
        cycle: distillation cycle that trained this SAE.
        core_lineage: for each core latent, ``[origin_cycle, origin_index]``: the cycle and
            dictionary index where it first appeared. Non-core latent j of cycle t has origin
            ``[t, j]`` by definition, so only the core needs storing.
    """

    model_type = "dmsae"

    def __init__(
        self,
        d_in: int = 2304,
        num_latents: int = 65536,
        core_size: int = 0,
        group_sizes: Sequence[int] | None = None,
        k: int = 320,
        variant: str = "dense_core",
        aux_k: int | None = None,
        aux_alpha: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        normalization_factor: float = 1.0,
        threshold: float = -1.0,
        base_model_id: str = "google/gemma-2-2b",
        base_model_file: str | None = None,
        hook_module: str = "model.layers.12",
        hook_layer: int | None = None,
        hook_name: str | None = None,
        mask_bos: bool = True,
        max_norm_ratio: float = 10.0,
        cycle: int = 0,
        core_lineage: Sequence[Sequence[int]] | None = None,
        **kwargs,
    ):
        self.d_in = d_in
        self.num_latents = num_latents
        self.core_size = core_size
        self.group_sizes = (
            list(group_sizes) if group_sizes is not None else matryoshka_group_sizes(num_latents - core_size)
        )
        self.k = k
        self.variant = variant
        self.aux_k = aux_k if aux_k is not None else max(d_in // 2, 1)
        self.aux_alpha = aux_alpha
        self.dead_tokens_threshold = dead_tokens_threshold
        self.normalization_factor = normalization_factor
        self.threshold = threshold
        self.base_model_id = base_model_id
        self.base_model_file = base_model_file
        self.hook_module = hook_module
        self.hook_layer = hook_layer if hook_layer is not None else hook_layer_index(hook_module)
        self.hook_name = hook_name or transformer_lens_hook_name(self.hook_layer)
        self.mask_bos = mask_bos
        self.max_norm_ratio = max_norm_ratio
        self.cycle = cycle
        self.core_lineage = (
            [list(map(int, origin)) for origin in core_lineage]
            if core_lineage is not None
            else [[cycle, j] for j in range(core_size)]
        )
        super().__init__(**kwargs)
        self.validate_dmsae()

    @property
    def k_noncore(self) -> int:
        """Latents BatchTopK keeps per token among the latents it masks (Eq. 4 for dense core)."""
        if self.variant == "dense_core":
            return noncore_k(self.k, self.num_latents, self.core_size)
        return self.k

    @property
    def prefix_sizes(self) -> list[int]:
        """Cumulative sizes c + m_i of the reconstructions the loss sums over (Eq. 5)."""
        sizes, total = [], self.core_size
        for group in self.group_sizes:
            total += group
            sizes.append(total)
        return sizes

    def with_core(self, core_lineage: Sequence[Sequence[int]], cycle: int, **overrides) -> "DMSAEConfig":
        """This configuration with another core (rows 0..c-1), as the next cycle or a transfer-stage
        SAE uses it: same K, the last Matryoshka group absorbs the change in c, threshold reset
        (the new model is untrained), any other field overridden."""
        config = copy.deepcopy(self)
        config.group_sizes = regroup_for_core(self.group_sizes, self.core_size, len(core_lineage))
        config.core_size = len(core_lineage)
        config.core_lineage = [list(map(int, origin)) for origin in core_lineage]
        config.cycle = cycle
        config.threshold = -1.0
        for name, value in overrides.items():
            setattr(config, name, value)
        config.validate_dmsae()
        return config

    def validate_dmsae(self) -> None:
        """Raise ValueError naming the field and the fix for every impossible combination."""
        for name in ("d_in", "num_latents", "k", "aux_k", "dead_tokens_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DMSAEConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.core_size, int) or not 0 <= self.core_size < self.num_latents:
            raise ValueError(
                f"DMSAEConfig.core_size must be an integer in [0, num_latents={self.num_latents}), "
                f"got {self.core_size!r}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"DMSAEConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.group_sizes or any(not isinstance(g, int) or g <= 0 for g in self.group_sizes):
            raise ValueError(f"DMSAEConfig.group_sizes must be a non-empty list of positive integers, got {self.group_sizes!r}")
        noncore = self.num_latents - self.core_size
        if sum(self.group_sizes) != noncore:
            raise ValueError(
                f"DMSAEConfig.group_sizes sum to {sum(self.group_sizes)} but must sum to num_latents - core_size "
                f"= {self.num_latents} - {self.core_size} = {noncore}; resize the last group to "
                f"{noncore - sum(self.group_sizes[:-1])} or pass group_sizes=None for SAEBench's fractions"
            )
        if self.k >= noncore:
            raise ValueError(
                f"DMSAEConfig.k = {self.k} must be smaller than the number of non-core latents "
                f"num_latents - core_size = {noncore}; lower k or grow num_latents"
            )
        if self.k_noncore == 0:
            raise ValueError(
                f"DMSAEConfig.k = {self.k} gives k_noncore = round(k * (K - c) / K) = 0 non-core latents per token "
                f"(K = {self.num_latents}, c = {self.core_size}); raise k"
            )
        if not self.aux_alpha >= 0:
            raise ValueError(f"DMSAEConfig.aux_alpha must be >= 0, got {self.aux_alpha!r}")
        if not self.normalization_factor > 0 or not math.isfinite(self.normalization_factor):
            raise ValueError(f"DMSAEConfig.normalization_factor must be a positive finite number, got {self.normalization_factor!r}")
        if not self.max_norm_ratio >= 0 or not math.isfinite(self.max_norm_ratio):
            raise ValueError(f"DMSAEConfig.max_norm_ratio must be a finite number >= 0 (0 keeps every position), got {self.max_norm_ratio!r}")
        if len(self.core_lineage) != self.core_size or any(len(origin) != 2 for origin in self.core_lineage):
            raise ValueError(
                f"DMSAEConfig.core_lineage must hold one [origin_cycle, origin_index] pair per core latent "
                f"({self.core_size}), got {len(self.core_lineage)} entries"
            )
        if self.hook_layer < 0:
            raise ValueError(f"DMSAEConfig.hook_layer must be >= 0, got {self.hook_layer!r}")


def hook_layer_index(hook_module: str) -> int:
    """The layer of a module path, its last integer: ``model.layers.12`` -> 12 (the one parser of
    hook paths; SAEBench's hook names are built from it)."""
    numbers = re.findall(r"\d+", hook_module)
    if not numbers:
        raise ValueError(
            f"DMSAEConfig.hook_layer is needed: hook_module {hook_module!r} has no layer index in its path"
        )
    return int(numbers[-1])
