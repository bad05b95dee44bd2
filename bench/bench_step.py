"""Time one SAE training step against dictionary_learning and SAELens at identical shapes.

    bash bench/setup_peers.sh                                # once: .bench-venv with both peers
    .bench-venv/bin/python bench/bench_step.py               # SmolLM2 shapes: d=576, K=8192, k=64, N=4096
    .bench-venv/bin/python bench/bench_step.py --d_in 2304 --num_latents 65536 --k 320 --batch_size 1024
    .bench-venv/bin/python bench/bench_step.py --allocator thp          # every contender on huge pages
    .bench-venv/bin/python bench/bench_step.py --device cuda --profile  # on a GPU, with a per-operator profile
    .bench-venv/bin/python bench/bench_step.py --device cuda --mixed_precision bf16 --contenders gemm dmsae dmsae-c0

Contenders, each a full optimisation step (forward, backward, optimizer) on the same random batch:
- ``gemm``: the dense encoder GEMM [N, d] x [d, K] alone, the floor of any step;
- ``dmsae``: our ``SAETrainer.step`` with a dense core of ``core_size`` latents; ``dmsae-c0``: no core;
- ``dmsae-latent-parallel``: ``LatentParallelTrainer.step`` on one process (a process group of
  one), the same SAE as ``dmsae``: what the latent-parallel bookkeeping costs where no other
  process shares the work;
- ``dictionary_learning``: ``MatryoshkaBatchTopKTrainer.update``;
- ``sae_lens``: ``MatryoshkaBatchTopKTrainingSAE`` stepped as SAELens's own trainer does.

Every contender runs in a fresh process (so its peak resident memory is its own), and the
contenders take turns over several rounds so that load from other users of the machine hits
them all alike; the table reports medians and ratios. Before timing, the c = 0 model is checked
against dictionary_learning on the same weights and batch (``bench.peers``).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import simple_parsing
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(ROOT))

CONTENDERS = ("gemm", "dmsae", "dmsae-c0", "dmsae-latent-parallel", "dictionary_learning", "sae_lens")
# glibc and PyTorch read these when a process starts: each contender's process gets them from the driver.
ALLOCATOR_ENVIRONMENT = {
    "glibc": {},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "retain": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)},
}


@dataclass
class BenchConfig:
    """Shapes and repetitions of the training-step benchmark."""

    d_in: int = 576
    """Activation width d."""
    num_latents: int = 8192
    """Dictionary size K."""
    k: int = 64
    """BatchTopK budget per token."""
    batch_size: int = 4096
    """Tokens per step N."""
    core_size: int = 256
    """Core latents c of the ``dmsae`` contender (``dmsae-c0`` has none)."""
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    """Which contenders to time, from: gemm, dmsae, dmsae-c0, dmsae-latent-parallel, dictionary_learning, sae_lens."""
    rounds: int = 3
    """Rounds; each contender runs once per round, in a fresh process, in rotating order."""
    steps: int = 3
    """Timed steps per process, after the warm-up steps."""
    warmup_steps: int = 2
    """Untimed steps per process (the first step also initialises b_dec). Two, because with
    ``--allocator retain`` the heap only reaches its steady size over the first two steps."""
    threads: int = 2
    """torch intra-op threads of every contender."""
    device: str = "cpu"
    """cpu, or cuda: every contender on the GPU (the step times then synchronise the device, and
    memory is torch's peak CUDA allocation instead of the process's resident memory)."""
    allocator: str = "glibc"
    """CPU memory allocator settings of every contender. glibc: its defaults, which unmap each
    block above 32 MiB when it is freed and page-fault it back in, 4 KiB at a time, on the next
    step (gradients and [N, K] tensors are such blocks at the paper's shape). thp: PyTorch's
    THP_MEM_ALLOC_ENABLE=1, so blocks of 2 MiB and more ask for transparent huge pages (512x
    fewer faults; needs /sys/kernel/mm/transparent_hugepage/enabled at madvise or always).
    retain: MALLOC_MMAP_MAX_=0 and a 16 GiB MALLOC_TRIM_THRESHOLD_, so freed blocks stay in
    the heap and are reused without faults, at the price of a heap that holds on to its peak."""
    omp_wait_policy: str = "PASSIVE"
    """OMP_WAIT_POLICY of every contender. PASSIVE: idle OpenMP threads sleep instead of spinning.
    On a machine shared with other jobs, spinning threads wait whole scheduler slices for a
    descheduled partner, which turns a 16 ms sort into 280 ms; ACTIVE suits a dedicated machine."""
    dead_fraction: float = 0.0
    """Fraction of latents marked dead, so that every contender also runs its AuxK loss."""
    numerics_batch: int = 1024
    """Tokens of the c = 0 numerics check against dictionary_learning (0 skips it)."""
    output: str = ""
    """Optional JSON file for the raw timings and the table."""
    profile: bool = False
    """Also profile one more step of every contender after its timed steps (torch.profiler) and
    print, after the table, where its time goes, operator by operator."""
    mixed_precision: str = "no"
    """no, or bf16: our steps under ``Accelerator(mixed_precision="bf16")`` (the encoder GEMM and the
    decode in bf16 from fp32 master weights) and the ``gemm`` floor in bf16, the floor a bf16 step is
    measured against; dictionary_learning and SAELens stay fp32."""
    worker: str = ""
    """Internal: run this one contender and print its measurements as JSON."""


# ---- One contender, inside its own process ----------------------------------------------


def resident_mb() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def dead_mask(config: BenchConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(config.num_latents, generator=generator) < config.dead_fraction).to(config.device)


def synchronize(device: str) -> None:
    """Wait for the queued kernels, so that a step's time is the step's work."""
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_step(config: BenchConfig, batch: torch.Tensor) -> Callable[[], None]:
    """The floor: the GEMM alone, in the batch's dtype, into a preallocated output (no allocation,
    no page faults)."""
    weight = torch.randn(config.d_in, config.num_latents, device=config.device, dtype=batch.dtype) / config.d_in**0.5
    output = batch.new_empty(config.batch_size, config.num_latents)
    return lambda: torch.mm(batch, weight, out=output)


def dmsae_step(config: BenchConfig, batch: torch.Tensor, core_size: int, latent_parallel: bool = False) -> Callable[[], None]:
    import torch.distributed as dist
    from accelerate import Accelerator

    from modeling_dmsae import DMSAEConfig, DMSAEModel
    from trainer.config import OptimizerConfig
    from trainer.sae.latent_parallel import LatentParallelTrainer
    from trainer.sae.training import SAETrainer

    sae_config = DMSAEConfig(d_in=config.d_in, num_latents=config.num_latents, k=config.k, core_size=core_size)
    accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision)
    if latent_parallel:  # its collectives need a process group, here of one process
        dist.init_process_group("gloo" if config.device == "cpu" else "nccl", store=dist.HashStore(), rank=0, world_size=1)
    trainer_class = LatentParallelTrainer if latent_parallel else SAETrainer
    trainer = trainer_class(DMSAEModel(sae_config), OptimizerConfig(), total_steps=100_000, accelerator=accelerator)
    dead = dead_mask(config)

    def step() -> None:
        trainer.tokens_since_fired[dead] = sae_config.dead_tokens_threshold
        trainer.step(batch)

    return step


def dictionary_learning_step(config: BenchConfig, batch: torch.Tensor) -> Callable[[], None]:
    from bench.peers import load_dictionary_learning_matryoshka
    from modeling_dmsae.configuration_dmsae import SAEBENCH_GROUP_FRACTIONS

    trainer = load_dictionary_learning_matryoshka().MatryoshkaBatchTopKTrainer(
        steps=100_000, activation_dim=config.d_in, dict_size=config.num_latents, k=config.k,
        layer=0, lm_name="bench", group_fractions=list(SAEBENCH_GROUP_FRACTIONS), device=config.device,
    )
    dead = dead_mask(config)
    steps_taken = 0

    def step() -> None:
        nonlocal steps_taken
        trainer.num_tokens_since_fired[dead] = trainer.dead_feature_threshold
        trainer.update(steps_taken, batch)
        steps_taken += 1

    return step


def sae_lens_step(config: BenchConfig, batch: torch.Tensor) -> Callable[[], None]:
    """SAELens's ``SAETrainer._train_step`` without its activation store and logging."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    from modeling_dmsae.configuration_dmsae import matryoshka_group_sizes

    widths = torch.tensor(matryoshka_group_sizes(config.num_latents)).cumsum(0).tolist()
    sae = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=config.d_in, d_sae=config.num_latents, k=config.k, matryoshka_widths=widths, device=config.device
        )
    )
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    dead = dead_mask(config)
    passes_since_fired = torch.zeros(config.num_latents, device=config.device)
    steps_taken = 0

    def step() -> None:
        nonlocal steps_taken
        sae.train()
        output = sae.training_forward_pass(
            TrainStepInput(
                sae_in=batch, coefficients={}, dead_neuron_mask=dead, n_training_steps=steps_taken, is_logging_step=False
            )
        )
        with torch.no_grad():
            did_fire = output.feature_acts.bool().float().sum(-2).bool()
            passes_since_fired.add_(1)[did_fire] = 0
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps_taken += 1

    return step


# What each contender imports, loaded before the baseline memory reading.
CONTENDER_MODULES = {
    "gemm": [],
    "dmsae": ["modeling_dmsae", "trainer.sae.training"],
    "dmsae-c0": ["modeling_dmsae", "trainer.sae.training"],
    "dmsae-latent-parallel": ["modeling_dmsae", "trainer.sae.latent_parallel"],
    "dictionary_learning": ["bench.peers", "modeling_dmsae.configuration_dmsae"],
    "sae_lens": ["sae_lens.saes.matryoshka_batchtopk_sae", "modeling_dmsae.configuration_dmsae"],
}


def memory_baseline_mb(contender: str, device: str) -> float:
    """Memory once the contender's code is imported and torch's kernels are loaded: what the
    step itself adds comes on top of this (resident memory on CPU, allocated memory on CUDA)."""
    for module in CONTENDER_MODULES[contender]:
        importlib.import_module(module)
    weight = torch.randn(64, 64, requires_grad=True, device=device)
    (torch.randn(64, 64, device=device) @ weight).relu().sum().backward()
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else resident_mb()


def peak_memory_mb(device: str) -> float:
    """The process's peak: resident memory on CPU, torch's peak allocation on CUDA."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_one_step(step: Callable[[], None], device: str) -> str:
    """torch.profiler's operator table for one step, by self time on the step's device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=20)


def run_worker(config: BenchConfig) -> dict:
    torch.set_num_threads(config.threads)
    baseline_mb = memory_baseline_mb(config.worker, config.device)
    torch.manual_seed(0)
    batch = torch.randn(config.batch_size, config.d_in, device=config.device)
    builders = {
        "gemm": lambda: gemm_step(config, batch.to(torch.bfloat16) if config.mixed_precision == "bf16" else batch),
        "dmsae": lambda: dmsae_step(config, batch, config.core_size),
        "dmsae-c0": lambda: dmsae_step(config, batch, 0),
        "dmsae-latent-parallel": lambda: dmsae_step(config, batch, config.core_size, latent_parallel=True),
        "dictionary_learning": lambda: dictionary_learning_step(config, batch),
        "sae_lens": lambda: sae_lens_step(config, batch),
    }
    step = builders[config.worker]()
    for _ in range(config.warmup_steps):
        step()
    synchronize(config.device)
    seconds = []
    for _ in range(config.steps):
        start = time.perf_counter()
        step()
        synchronize(config.device)
        seconds.append(time.perf_counter() - start)
    measured = {"seconds": seconds, "peak_mb": peak_memory_mb(config.device), "baseline_mb": baseline_mb}
    if config.profile:
        measured["profile"] = profile_one_step(step, config.device)
    return measured


# ---- The driver ---------------------------------------------------------------------------


def run_in_fresh_process(config: BenchConfig, contender: str) -> dict:
    arguments = [sys.executable, str(Path(__file__).resolve())]
    for name, value in asdict(config).items():
        if name in ("worker", "contenders", "output"):
            continue
        arguments += [f"--{name}", str(value)]
    environment = {**os.environ, "OMP_WAIT_POLICY": config.omp_wait_policy, **ALLOCATOR_ENVIRONMENT[config.allocator]}
    result = subprocess.run(
        arguments + ["--worker", contender], capture_output=True, text=True, cwd=ROOT, env=environment
    )
    if result.returncode != 0:
        raise RuntimeError(f"contender {contender} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_numerics(config: BenchConfig) -> str:
    """c = 0 encode, prefix reconstructions and losses against dictionary_learning (raises on a mismatch)."""
    from bench.peers import compare_with_dictionary_learning
    from modeling_dmsae import DMSAEConfig, DMSAEModel

    torch.manual_seed(0)
    model = DMSAEModel(DMSAEConfig(d_in=config.d_in, num_latents=config.num_latents, k=config.k))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.3)
    candidates = torch.arange(config.num_latents) % 3 == 0
    comparison = compare_with_dictionary_learning(model, torch.randn(config.numerics_batch, config.d_in), candidates)
    return (
        f"numerics vs dictionary_learning (c = 0, {config.numerics_batch} tokens, AuxK on): OK; "
        f"max latent diff {comparison.latent_difference:.1e}, max prefix diff {comparison.prefix_difference:.1e}, "
        f"{comparison.swapped_at_cut} entries swapped at the BatchTopK cut; reconstruction loss "
        f"{comparison.reconstruction_loss:.4f} = L^2 x {comparison.dictionary_learning_l2_loss:.4f}; "
        f"AuxK {comparison.aux_loss:.5f} vs {comparison.dictionary_learning_aux_loss:.5f}"
    )


def summarize(config: BenchConfig, results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    medians = {name: statistics.median(s for run in runs for s in run["seconds"]) for name, runs in results.items()}
    for name, runs in results.items():
        seconds = medians[name]
        row = {
            "contender": name,
            "step_ms": 1000 * seconds,
            "tokens_per_s": config.batch_size / seconds,
            "peak_mb": max(run["peak_mb"] for run in runs),
            "step_memory_mb": max(run["peak_mb"] - run["baseline_mb"] for run in runs),
        }
        if "gemm" in medians:
            row["x_gemm"] = seconds / medians["gemm"]
        if "dictionary_learning" in medians:
            row["speedup_vs_dictionary_learning"] = medians["dictionary_learning"] / seconds
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = [
        ("contender", "contender", "{}"),
        ("step_ms", "step (ms)", "{:.0f}"),
        ("tokens_per_s", "tokens/s", "{:,.0f}"),
        ("x_gemm", "x encoder GEMM", "{:.2f}"),
        ("speedup_vs_dictionary_learning", "speed-up vs dictionary_learning", "{:.2f}"),
        ("peak_mb", "peak memory (MiB)", "{:,.0f}"),
        ("step_memory_mb", "above baseline (MiB)", "{:,.0f}"),
    ]
    columns = [column for column in columns if any(column[0] in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    config = simple_parsing.parse(BenchConfig)
    if config.worker:
        print(json.dumps(run_worker(config)))
        return
    if config.allocator not in ALLOCATOR_ENVIRONMENT:
        raise SystemExit(f"--allocator must be one of {list(ALLOCATOR_ENVIRONMENT)}, got {config.allocator!r}")
    if config.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {config.device!r}")
    if config.mixed_precision not in ("no", "bf16"):
        raise SystemExit(f"--mixed_precision must be no or bf16, got {config.mixed_precision!r}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run on a GPU machine or use --device cpu")
    unknown = sorted(set(config.contenders) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    device = torch.cuda.get_device_name() if config.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(
        f"{device}: d={config.d_in} K={config.num_latents} k={config.k} N={config.batch_size} c={config.core_size} "
        f"precision={config.mixed_precision} threads={config.threads} allocator={config.allocator} OMP_WAIT_POLICY={config.omp_wait_policy} torch={torch.__version__}",
        flush=True,
    )
    if config.numerics_batch:
        torch.set_num_threads(config.threads)
        print(check_numerics(config), flush=True)
    results: dict[str, list[dict]] = {name: [] for name in config.contenders}
    for round_index in range(config.rounds):
        shift = round_index % len(config.contenders)
        for contender in config.contenders[shift:] + config.contenders[:shift]:
            run = run_in_fresh_process(config, contender)
            results[contender].append(run)
            times = ", ".join(f"{1000 * s:.0f}" for s in run["seconds"])
            print(f"round {round_index + 1} {contender:>20}: {times} ms, peak memory {run['peak_mb']:.0f} MiB", flush=True)
    rows = summarize(config, results)
    table = markdown_table(rows)
    print(table)
    for contender, runs in results.items():
        if "profile" in runs[0]:
            print(f"\nProfile of one {contender} step (round 1):\n{runs[0]['profile']}")
    if config.output:
        Path(config.output).write_text(json.dumps({"config": asdict(config), "runs": results, "table": rows}, indent=2))


if __name__ == "__main__":
    main()
