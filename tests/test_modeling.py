"""DMSAEModel against a slow dense reference written from the paper's equations, plus the
frozen core, AuxK, cycle transitions and save/load round trips."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer.config import OptimizerConfig
from trainer.sae.training import SAETrainer


def make_config(**overrides) -> DMSAEConfig:
    fields = dict(
        d_in=24, num_latents=160, core_size=12, group_sizes=[12, 24, 48, 64], k=6,
        hook_module="model.layers.1", base_model_id="tiny-random", dead_tokens_threshold=1000,
    )
    fields.update(overrides)
    return DMSAEConfig(**fields)


def make_model(seed: int = 0, **overrides) -> DMSAEModel:
    torch.manual_seed(seed)
    model = DMSAEModel(make_config(**overrides))
    with torch.no_grad():  # non-trivial biases so every term of Eq. 1-2 matters
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.3)
    return model


# ---- The slow reference: Eq. 1-5 written densely ------------------------------------------


def reference_latents(model: DMSAEModel, x: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    f = torch.relu((x - model.b_dec) @ model.W_enc + model.b_enc)  # Eq. 1, [B, K]
    masked_from = cfg.core_size if cfg.variant == "dense_core" else 0
    k = round(cfg.k * (cfg.num_latents - cfg.core_size) / cfg.num_latents) if cfg.variant == "dense_core" else cfg.k
    block = f[:, masked_from:]
    keep = torch.zeros_like(block.flatten(), dtype=torch.bool)
    keep[block.flatten().topk(k * x.shape[0]).indices] = True  # BatchTopK over the whole batch
    masked = torch.where(keep.view_as(block), block, torch.zeros_like(block))
    return torch.cat([f[:, :masked_from], masked], dim=1)  # Eq. 3


def reference_loss(model: DMSAEModel, x: torch.Tensor, dead: torch.Tensor | None):
    cfg = model.config
    f = reference_latents(model, x)
    prefix_losses = []
    m = cfg.core_size
    for group in cfg.group_sizes:  # core + prefix_i, no core-only term (Eq. 5)
        m += group
        x_hat = f[:, :m] @ model.W_dec[:m] + model.b_dec  # Eq. 2 on the prefix
        prefix_losses.append((x - x_hat).pow(2).sum(-1).mean())
    aux = torch.zeros(())
    if dead is not None and dead.any():
        pre = torch.relu((x - model.b_dec) @ model.W_enc + model.b_enc)
        residual = (x - x_hat).detach()
        k_aux = min(cfg.aux_k, int(dead.sum()))
        top = torch.where(dead[None], pre, torch.full_like(pre, -1.0)).topk(k_aux, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
        error = (residual - acts @ model.W_dec).pow(2).sum(-1).mean()
        aux = error / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    loss = torch.stack(prefix_losses).sum() + cfg.aux_alpha * aux
    return loss, torch.stack(prefix_losses), x_hat, f


@pytest.mark.parametrize("variant", ["dense_core", "sparse_core"])
@pytest.mark.parametrize("core_size", [0, 12])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("input_gradient", [False, True], ids=["params-only", "with-input-grad"])
def test_loss_and_gradients_match_dense_reference(variant, core_size, with_dead, input_gradient):
    """Loss, latents and every gradient against Eq. 1-5 written densely. Without an input
    gradient, b_dec's gradient takes its own route (one [K] x [K, d] product)."""
    groups = [12, 24, 48, 76 - core_size]
    model = make_model(variant=variant, core_size=core_size, group_sizes=groups)
    x = (torch.randn(64, 24) * 2).requires_grad_(input_gradient)
    dead = (torch.arange(160) % 3 == 0) if with_dead else None

    output = model(x, dead_latents=dead, use_threshold=False)
    output.loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    our_input_gradient = x.grad.clone() if input_gradient else None
    model.zero_grad()
    x.grad = None

    loss, prefix_losses, x_hat, f = reference_loss(model, x, dead)
    loss.backward()
    torch.testing.assert_close(output.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.prefix_losses, prefix_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.reconstruction, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.latents, f, rtol=1e-5, atol=1e-5)
    if with_dead:
        assert output.aux_loss > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    if input_gradient:
        torch.testing.assert_close(our_input_gradient, x.grad, rtol=1e-4, atol=1e-5, msg="gradient of the input")


def test_normalization_factor_is_transparent():
    """Scaling the inputs and the factor together scales the reconstruction and nothing else."""
    model = make_model()
    x = torch.randn(32, 24)
    base = model(x, use_threshold=False)
    model.config.normalization_factor = 7.0
    scaled = model(x * 7.0, use_threshold=False)
    torch.testing.assert_close(scaled.reconstruction, base.reconstruction * 7.0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scaled.loss, base.loss)


# ---- Masks -----------------------------------------------------------------------------------


def test_dense_core_never_masks_core_and_budgets_noncore():
    model = make_model(k=10)  # k_noncore = round(10 * 148 / 160) = round(9.25) = 9
    assert model.config.k_noncore == 9
    x = torch.randn(50, 24)
    out = model(x, use_threshold=False)
    f = torch.relu((x - model.b_dec) @ model.W_enc + model.b_enc)
    assert torch.equal(out.latents[:, :12], f[:, :12])  # every positive core activation kept
    assert int((out.latents[:, 12:] > 0).sum()) == 9 * 50
    torch.testing.assert_close(out.l0_core, (f[:, :12] > 0).float().sum(1).mean())
    torch.testing.assert_close(out.l0_noncore, torch.tensor(9.0))
    torch.testing.assert_close(out.l0, out.l0_core + out.l0_noncore)  # Eq. 9


def test_sparse_core_masks_globally():
    model = make_model(k=10, variant="sparse_core")
    x = torch.randn(50, 24)
    out = model(x, use_threshold=False)
    assert int((out.latents > 0).sum()) == 10 * 50
    assert model.config.k_noncore == 10


@pytest.mark.parametrize(
    "k, K, c, expected",
    [(320, 65536, 197, 319), (3, 8, 3, 2), (5, 16, 8, 3), (4, 10, 5, 2), (80, 65536, 197, 80)],
)
def test_k_noncore_rounds_half_up(k, K, c, expected):
    # 3*5/8 = 1.875 -> 2; 5*8/16 = 2.5 -> 3 (half up, not banker's); 4*5/10 = 2.0 -> 2
    cfg = DMSAEConfig(d_in=4, num_latents=K, core_size=c, group_sizes=[K - c], k=k, hook_module="model.layers.0")
    assert cfg.k_noncore == expected


def test_threshold_encodes_single_tokens():
    model = make_model()
    model.config.threshold = 0.05
    model.eval()
    x = torch.randn(5, 24)
    batch = model.encode(x)
    for i in range(5):
        torch.testing.assert_close(model.encode(x[i]), batch[i])
    f = torch.relu((x - model.b_dec) @ model.W_enc + model.b_enc)
    expected = torch.cat([f[:, :12], f[:, 12:] * (f[:, 12:] > 0.05)], dim=1)
    torch.testing.assert_close(batch, expected)


def test_missing_threshold_is_a_clear_error():
    model = make_model().eval()
    with pytest.raises(ValueError, match="no inference threshold"):
        model.encode(torch.randn(2, 24))


def test_decode_prefix_matches_forward_prefixes():
    model = make_model()
    x = torch.randn(16, 24)
    out = model(x, use_threshold=False)
    for i in range(len(model.config.group_sizes)):
        x_hat = model.decode(out.latents, num_groups=i + 1)
        assert torch.allclose(x - x_hat, x - x_hat)  # finite
        err = (x - x_hat).pow(2).sum(-1).mean()
        torch.testing.assert_close(err, out.prefix_losses[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.decode(out.latents), out.reconstruction, rtol=1e-5, atol=1e-5)


# ---- Frozen core -----------------------------------------------------------------------------


def test_core_rows_stay_bitwise_frozen_while_everything_else_trains():
    model = make_model()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trainer = SAETrainer(model, OptimizerConfig(lr=3e-3, warmup_steps=2), total_steps=60)
    assert all(p is not trainer.sae.core_encoder for group in trainer.optimizer.param_groups for p in group["params"])
    for _ in range(60):
        trainer.step(torch.randn(128, 24))
    after = trainer.sae.state_dict()
    assert torch.equal(after["core_encoder"], before["core_encoder"])
    for name in ("encoder", "b_enc", "W_dec", "b_dec"):
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    c = model.config.core_size
    assert not torch.equal(after["W_dec"][:c], before["W_dec"][:c]), "core decoder must train"
    assert not torch.equal(after["b_enc"][:c], before["b_enc"][:c]), "core b_enc must train"
    moments = [state for state in trainer.optimizer.state.values()]
    assert sum(s["exp_avg"].numel() for s in moments) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(after["W_dec"].norm(dim=-1), torch.ones(160))


def test_decoder_gradient_projection_removes_parallel_component():
    model = make_model()
    with torch.no_grad():  # rows of assorted norms: the projection must not assume unit rows
        model.W_dec.mul_(torch.rand(model.W_dec.shape[0], 1) + 0.5)
    model(torch.randn(32, 24), use_threshold=False).loss.backward()
    gradient = model.W_dec.grad.clone()
    model.remove_decoder_parallel_gradient_(rows_per_block=7)  # blocks that do not divide K
    directions = torch.nn.functional.normalize(model.W_dec.detach(), dim=-1)
    expected = gradient - (gradient * directions).sum(-1, keepdim=True) * directions
    torch.testing.assert_close(model.W_dec.grad, expected)
    assert (model.W_dec.grad * model.W_dec).sum(-1).abs().max() < 1e-5


# ---- AuxK ------------------------------------------------------------------------------------


def _toy_dead_latent_run(aux_alpha: float) -> float:
    """Fraction of latents dead after training on sparse combinations of as many true
    directions as latents, starting with a third of the latents pushed out of the BatchTopK
    competition (weak encoders: positive pre-activations that never win the top-k)."""
    torch.manual_seed(0)
    config = make_config(num_latents=96, core_size=0, group_sizes=[16, 80], k=4, aux_alpha=aux_alpha, dead_tokens_threshold=512)
    model = DMSAEModel(config)
    with torch.no_grad():
        model.encoder[::3] *= 0.05
    trainer = SAETrainer(model, OptimizerConfig(lr=5e-3, warmup_steps=1), total_steps=100)
    truth = torch.nn.functional.normalize(torch.randn(96, 24), dim=-1)
    for _ in range(100):
        codes = (torch.rand(256, 96) < 4 / 96) * torch.rand(256, 96) * 4
        trainer.step(codes @ truth)
    return float(trainer.dead_latents().float().mean())


def test_auxk_revives_dead_latents():
    without_aux = _toy_dead_latent_run(aux_alpha=0.0)
    with_aux = _toy_dead_latent_run(aux_alpha=1.0)
    assert without_aux > 0.25, "the toy problem must keep many latents dead without AuxK"
    assert with_aux < without_aux / 2


# ---- Cycle transition and lineage ------------------------------------------------------------


def test_next_cycle_copies_selected_rows_and_reinitialises_the_rest():
    model = make_model()
    selected = [40, 3, 150, 7]  # a core latent (3, 7) and non-core ones
    torch.manual_seed(1)
    nxt = model.next_cycle(selected)
    assert nxt.config.core_size == 4 and nxt.config.cycle == 1
    assert sum(nxt.config.group_sizes) == 160 - 4
    assert torch.equal(nxt.core_encoder, model.encoder_weight[selected])
    assert not nxt.core_encoder.requires_grad
    assert torch.all(nxt.b_enc == 0) and torch.all(nxt.b_dec == 0)
    assert not torch.allclose(nxt.W_dec[:4], model.W_dec[selected])
    assert not torch.allclose(nxt.encoder[:10], model.encoder[:10])
    old = model.lineage()
    assert nxt.lineage()[:4].tolist() == old[selected].tolist()
    assert nxt.lineage()[4].tolist() == [1, 4]
    # lineage of a core latent carried twice keeps its origin
    third = nxt.next_cycle([1, 20])
    assert third.lineage()[:2].tolist() == [old[3].tolist(), [1, 20]]


def test_next_cycle_rejects_bad_selections():
    model = make_model()
    with pytest.raises(ValueError, match="duplicates"):
        model.next_cycle([1, 1])
    with pytest.raises(ValueError, match=r"\[0, 160\)"):
        model.next_cycle([160])


# ---- Config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_in=0), "d_in"),
        (dict(num_latents=-5), "num_latents"),
        (dict(k=0), "k"),
        (dict(core_size=-1), "core_size"),
        (dict(group_sizes=[12, 24, 48, 60]), "group_sizes"),
        (dict(group_sizes=[12, 0, 48, 88]), "group_sizes"),
        (dict(k=148), "k"),
        (dict(k=1, core_size=100, group_sizes=[60]), "k_noncore"),
        (dict(variant="dense"), "variant"),
        (dict(aux_alpha=-1.0), "aux_alpha"),
        (dict(normalization_factor=0.0), "normalization_factor"),
        (dict(core_lineage=[[0, 1]]), "core_lineage"),
    ],
)
def test_config_rejects_impossible_combinations(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config(**overrides)


def test_config_error_names_the_fix_for_groups():
    with pytest.raises(ValueError, match="resize the last group to 64"):
        make_config(group_sizes=[12, 24, 48, 60])


def test_paper_config_groups():
    cfg = DMSAEConfig()
    assert cfg.group_sizes == [2048, 4096, 8192, 16384, 34816]
    assert cfg.hook_name == "blocks.12.hook_resid_post" and cfg.hook_layer == 12


# ---- Save / load -----------------------------------------------------------------------------


def _run_fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_save_load_round_trip_both_ways(tmp_path):
    model = make_model().next_cycle([5, 9, 100])
    model.config.threshold = 0.125
    with torch.no_grad():
        model.b_enc.normal_()
    model.save_pretrained(tmp_path)
    x = torch.randn(8, 24)
    torch.save(x, tmp_path / "x.pt")
    expected = model.eval().encode(x)
    torch.save(expected, tmp_path / "expected.pt")
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_dmsae.py", "configuration_dmsae.py"} <= files
    assert json.loads((tmp_path / "config.json").read_text())["core_lineage"][0] == [0, 5]

    # A process that cannot import the package: trust_remote_code runs the saved code files.
    _run_fresh_python(f"""
        import sys
        sys.modules["modeling_dmsae"] = None  # importing the package now fails
        import torch
        from transformers import AutoModel
        try:
            import modeling_dmsae
            raise SystemExit("package should not be importable")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.encode(torch.load({str(tmp_path / 'x.pt')!r}))
        assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r}))
        assert model.lineage()[:3].tolist() == [[0, 5], [0, 9], [0, 100]]
    """)
    # With the package imported, plain AutoModel.
    _run_fresh_python(f"""
        import torch, modeling_dmsae
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}).eval()
        assert isinstance(model, modeling_dmsae.DMSAEModel)
        assert torch.equal(model.encode(torch.load({str(tmp_path / 'x.pt')!r})), torch.load({str(tmp_path / 'expected.pt')!r}))
    """)


def test_loaded_parameters_equal_saved_and_bf16_round_trip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "fp32")
    loaded = AutoModel.from_pretrained(tmp_path / "fp32")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16 = AutoModel.from_pretrained(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(bf16.state_dict()[name], tensor), name
    as_fp32 = AutoModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    torch.testing.assert_close(as_fp32.W_dec, model.W_dec.float())


def test_saebench_interface():
    model = make_model()
    assert model.W_enc.shape == (24, 160) and model.W_dec.shape == (160, 24)
    assert model.b_enc.shape == (160,) and model.b_dec.shape == (24,)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert torch.equal(model.W_enc[:, :12], model.core_encoder.T)


def test_bf16_mixed_precision_training_step():
    """Under Accelerate's bf16 autocast the sparse paths mix bf16 activations with fp32 weights."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = make_model()
    core = model.core_encoder.clone()
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests fixed the precision to fp32
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    trainer = SAETrainer(model, OptimizerConfig(lr=1e-3, warmup_steps=2), total_steps=8, accelerator=accelerator)
    losses = [float(trainer.step(torch.randn(128, 24)).loss) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.sae.W_dec.dtype == torch.float32 and torch.equal(trainer.sae.core_encoder, core)
    AcceleratorState._reset_state(reset_partial_state=True)  # leave fp32 to the tests that follow


def test_gradient_accumulation_steps_the_optimizer_every_nth_batch():
    from accelerate import Accelerator

    model = make_model()
    trainer = SAETrainer(
        model, OptimizerConfig(lr=1e-3, warmup_steps=1), total_steps=2, accelerator=Accelerator(cpu=True, gradient_accumulation_steps=2)
    )
    initial = model.encoder.detach().clone()
    snapshots = []
    for _ in range(4):
        trainer.step(torch.randn(64, 24))
        snapshots.append(trainer.sae.encoder.detach().clone())
    assert torch.equal(snapshots[0], initial), "no optimiser step after the first of two accumulated batches"
    assert trainer.scheduler.last_epoch == 2
    assert torch.equal(snapshots[1], snapshots[2]) and not torch.equal(snapshots[0], snapshots[1])
    assert not torch.equal(snapshots[2], snapshots[3])
