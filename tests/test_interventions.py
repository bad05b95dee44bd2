"""Interventions (``DMSAEModel.splice``): the SAE spliced into a causal LM at ``config.hook_module``,
with the error term, latent edits and steering, under ``model.generate`` too, leaving the positions
the trainer excludes untouched; and the same from ``trust_remote_code`` without the package.

The three claims of issue 20 run on the embedded SmolLM2 and a small DMSAE trained on its layer 12
(tests/conftest.py); the mechanics (units, tuples, padding, checks) on tiny random Llamas.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from modeling_dmsae import DMSAEConfig, DMSAEModel, logit_effect
from trainer.harvest.base_model import IGNORE_INDEX, mean_next_token_loss, next_token_targets

PROMPT = "def read_config(path):\n    \"\"\"Read the configuration file at path.\"\"\"\n    with open(path) as handle:\n"
STEERED_TOKENS = 10  # how many tokens of a latent's logit effect it is said to name
# Steering at layer 12 of 30 needs a vector several times the residual's norm to carry through the
# later layers (a sweep over 1, 2, 4, 8, 16 median norms on this SAE: mixed below 8, raised at 8 and 16).
STEERING_NORMS = 8


def prompt_ids(tokenizer, bos: bool = True) -> torch.Tensor:
    """[1, T] the prompt, after a BOS as the trainer's contexts start (SmolLM2's tokenizer adds none)."""
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1) if bos else ids


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


# ---- The three claims, on the embedded SmolLM2 --------------------------------------------------


def test_error_term_splice_reproduces_the_clean_logits_and_reconstruction_matches_the_metrics(embedded_model, embedded_sae):
    model, tokenizer = embedded_model
    sae, ids = embedded_sae.sae, prompt_ids(tokenizer)
    clean = logits(model, ids)
    with sae.splice(model, error_term=True) as splice:
        with_error = logits(model, ids)
    # Tolerance 0: x + (edited - unedited reconstruction) is x itself without edits.
    assert torch.equal(with_error, clean)
    assert not splice.kept[0, 0] and splice.kept[0, 1:].all()  # BOS untouched, every other token spliced
    assert splice.latents.values.numel() > 0  # the SAE did run

    with sae.splice(model) as splice:
        reconstructed = logits(model, ids)
    assert torch.equal(reconstructed[0, 0], clean[0, 0])  # BOS sees only itself, and it is untouched
    assert (reconstructed[0, 1:] - clean[0, 1:]).abs().max() > 1.0
    # The spliced loss is the run metrics' ce_loss_spliced (same positions, same counted predictions).
    targets = next_token_targets(ids, splice.kept)
    counted = targets != IGNORE_INDEX
    spliced_loss = F.cross_entropy(reconstructed[counted], targets[counted])

    def metrics_splice(hidden: torch.Tensor) -> torch.Tensor:
        return sae(hidden, use_threshold=True, output_dense_latents=False).reconstruction.to(hidden.dtype)

    hook = model.get_submodule(sae.config.hook_module)
    expected = mean_next_token_loss(model, hook, ids, splice.kept, metrics_splice)
    assert float(spliced_loss) == pytest.approx(expected, rel=1e-5)
    print(f"error-term splice: max |logit diff| = {float((with_error - clean).abs().max())}; "
          f"reconstruction: loss {float(spliced_loss):.4f} vs clean {float(F.cross_entropy(clean[counted], targets[counted])):.4f}")


def test_ablating_a_frequently_firing_latent_changes_the_logits_from_where_it_fires(embedded_model, embedded_sae):
    model, tokenizer = embedded_model
    sae, ids = embedded_sae.sae, prompt_ids(tokenizer)
    clean = logits(model, ids)
    with sae.splice(model, error_term=True) as splice:
        model(input_ids=ids)
    rows = splice.kept[0].nonzero().squeeze(1)  # the latents' rows are the kept positions, in order
    latents = splice.latents
    frequent = int(torch.bincount(latents.cols, minlength=sae.config.num_latents).argmax())
    fires_at = rows[latents.rows[latents.cols == frequent]]
    assert len(fires_at) >= len(rows) // 4  # a frequently firing latent: on at least a quarter of the tokens

    with sae.splice(model, error_term=True, ablate=[frequent]):
        ablated = logits(model, ids)
    first = int(fires_at.min())
    change = (ablated - clean).abs().amax(-1)[0]  # [T] largest logit change at each position
    assert torch.equal(ablated[0, :first], clean[0, :first])  # causal: nothing changes before it fires
    assert change[fires_at].min() > 0.01 and change.max() > 0.5
    print(f"ablating latent {frequent} (fires at {len(fires_at)} of {len(rows)} tokens): max |logit change| "
          f"{float(change.max()):.3f}, median over its positions {float(change[fires_at].median()):.3f}")


def test_steering_with_a_latent_raises_the_probability_of_the_tokens_its_logit_effect_names(embedded_model, embedded_sae):
    model, tokenizer = embedded_model
    sae, x = embedded_sae.sae, embedded_sae.activations
    ids = prompt_ids(tokenizer)
    # The latent with the clearest direct effect: the largest top logit among latents that fire.
    alive = sae(x, use_threshold=True, output_dense_latents=False).fired
    effect = logit_effect(sae, model)
    assert effect.shape == (sae.config.num_latents, model.config.vocab_size)
    latent = int(torch.where(alive, effect.amax(-1), -torch.inf).argmax())
    named = effect[latent].topk(STEERED_TOKENS).indices
    # Strength: a vector STEERING_NORMS times as long as a typical activation (decoder rows are unit
    # vectors in the SAE's units, normalization_factor times longer in the activations').
    strength = STEERING_NORMS * float(x.norm(dim=-1).median()) / sae.config.normalization_factor

    def named_probability(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)[0, 1:, named].sum(-1)  # [T - 1] at every spliced position

    before = named_probability(logits(model, ids))
    with sae.splice(model, error_term=True, steer={latent: strength}):
        after = named_probability(logits(model, ids))
    assert after.mean() > 100 * before.mean() and (after > before).float().mean() > 0.9
    print(f"steering latent {latent} (strength {strength:.2f}): P(its top {STEERED_TOKENS} logit-effect tokens "
          f"{tokenizer.convert_ids_to_tokens(named.tolist())}) mean {float(before.mean()):.2e} -> {float(after.mean()):.2e}, "
          f"raised at {int((after > before).sum())} of {len(after)} positions")


def test_splice_under_generate_and_without_bos_excludes_the_sink_by_its_norm(embedded_model, embedded_sae):
    model, tokenizer = embedded_model
    sae = embedded_sae.sae
    ids = prompt_ids(tokenizer, bos=False)[:, :12]  # no BOS: the first token is the attention sink
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        clean = model.generate(ids, **settings)
        with sae.splice(model, error_term=True) as splice:
            assert torch.equal(model.generate(ids, **settings), clean)
        assert splice.kept.shape == (1, 1) and splice.kept.all()  # the last step spliced its one new token
        with sae.splice(model) as splice:
            model(input_ids=ids)
        assert not splice.kept[0, 0] and splice.kept[0, 1:].all()  # the sink's norm excludes it
        effect = logit_effect(sae, model)
        latent = int(effect.amax(-1).argmax())
        with sae.splice(model, error_term=True, steer={latent: 20.0}):
            steered = model.generate(ids, **settings)
    assert not torch.equal(steered, clean)


# ---- Mechanics, on tiny random Llamas ------------------------------------------------------------


def tiny_sae(hook_module: str = "model.layers.1", seed: int = 0, **overrides) -> DMSAEModel:
    torch.manual_seed(seed)
    fields = dict(d_in=32, num_latents=64, group_sizes=[16, 48], k=4, hook_module=hook_module, normalization_factor=3.0, threshold=0.05)
    config = DMSAEConfig(**{**fields, **overrides})
    return DMSAEModel(config).eval().requires_grad_(False)


def hooked_output(model, sae, input_ids, attention_mask=None, **edits) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(clean, spliced) outputs of the hooked module, and the splice."""
    captured = []

    def capture(module, args, output):
        captured.append((output if isinstance(output, torch.Tensor) else output[0]).clone())

    module = model.get_submodule(sae.config.hook_module)
    with torch.no_grad():
        handle = module.register_forward_hook(capture)
        model(input_ids=input_ids, attention_mask=attention_mask)
        handle.remove()
        with sae.splice(model, **edits) as splice:
            handle = module.register_forward_hook(capture)  # after the splice's hook: sees its output
            model(input_ids=input_ids, attention_mask=attention_mask)
            handle.remove()
    return captured[0], captured[1], splice


@pytest.mark.parametrize("hook_module", ["model.layers.1", "model.layers.1.self_attn"])  # tensor, tuple output
def test_edits_act_in_activation_units_at_the_kept_positions_only(hook_module):
    model, sae = tiny_model(), tiny_sae(hook_module, max_norm_ratio=0.0)
    input_ids = torch.tensor([[2, 2, 0, 5, 9, 17, 33, 40], [0, 7, 8, 9, 10, 11, 12, 13]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])  # left padding, BOS after it
    W = sae.W_dec * sae.config.normalization_factor  # decoder directions in activation units
    clean, steered, splice = hooked_output(model, sae, input_ids, attention_mask, error_term=True, steer={3: 2.5})
    kept = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(splice.kept, kept)  # padding and the BOS starting each row are left alone
    torch.testing.assert_close(steered[kept], clean[kept] + 2.5 * W[3])
    assert torch.equal(steered[~kept], clean[~kept])

    latents = sae.encode(clean[kept])
    j = int((latents > 0).sum(0).argmax())  # a latent that fires here
    for edits, new in (
        (dict(ablate=[j]), torch.zeros_like(latents[:, j])),
        (dict(clamp={j: 4.0}), torch.full_like(latents[:, j], 4.0)),
        (dict(scale={j: 3.0}), 3 * latents[:, j]),
    ):
        _, edited, _ = hooked_output(model, sae, input_ids, attention_mask, error_term=True, **edits)
        expected = clean[kept] + (new - latents[:, j]).unsqueeze(1) * W[j]
        torch.testing.assert_close(edited[kept], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(edited[~kept], clean[~kept])
    _, reconstructed, _ = hooked_output(model, sae, input_ids, attention_mask)
    torch.testing.assert_close(reconstructed[kept], sae.decode(latents), rtol=1e-5, atol=1e-5)


def test_generation_steps_judge_their_new_token_against_the_prompts_median_norm():
    """A one-token step's own median is its own norm, so the trainer's rule could never exclude it;
    the splice compares it with the median of the forward that started the sequence instead."""
    ratio = 0.7  # well below 1, so that a generation step judged by its own median would always be excluded
    model, sae = tiny_model(), tiny_sae(max_norm_ratio=ratio)
    seen = []  # (original hidden states, positions kept) of every forward

    def record(module, args, output):
        seen.append([output.clone()])

    module = model.get_submodule(sae.config.hook_module)
    handle = module.register_forward_hook(record)  # before the splice's hook: sees the original output
    prompt = torch.tensor([[0, 5, 9, 17, 33, 40, 41, 42, 60, 61]])
    with torch.no_grad(), sae.splice(model, error_term=True) as splice:
        after = module.register_forward_hook(lambda module, args, output: seen[-1].append(splice.kept.clone()))
        model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
    handle.remove()
    after.remove()
    (prompt_hidden, prompt_kept), *steps = seen
    norms = prompt_hidden.norm(dim=-1)
    median = norms[0, 1:].median()  # over the tokens after BOS
    assert torch.equal(prompt_kept[0, 1:], norms[0, 1:] <= ratio * median) and not prompt_kept[0, 0]
    assert len(steps) == 7 and all(hidden.shape[1] == 1 for hidden, _ in steps)
    decisions = [bool(kept) for _, kept in steps]
    assert decisions == [bool(hidden.norm() <= ratio * median) for hidden, _ in steps]
    assert len(set(decisions)) == 2  # some new tokens kept, some not: the prompt's median decided


def test_bad_edits_and_a_foreign_model_are_refused_before_any_forward():
    model, sae = tiny_model(), tiny_sae()
    refused = {
        "out of range": dict(ablate=[64]),
        "edited twice": dict(ablate=[3], clamp={3: 1.0}),
        "finite": dict(steer={1: float("nan")}),
    }
    for message, edits in refused.items():
        with pytest.raises(ValueError, match=message), sae.splice(model, **edits):
            pass
    with pytest.raises(ValueError, match="has no module 'model.layers.9'"), tiny_sae("model.layers.9").splice(model):
        pass
    with pytest.raises(ValueError, match="no calibrated inference threshold"), tiny_sae(threshold=-1.0).splice(model, use_threshold=True):
        pass
    assert not model.get_submodule("model.layers.1")._forward_hooks  # nothing left behind


REMOTE_SPLICE = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_dmsae", "hub_cards", "trainer"):
        sys.modules[name] = None  # importing the project now fails: only the saved code can run
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    sae = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
    ids = torch.tensor([[0, 5, 9, 17, 33, 40, 41, 42]])
    with torch.no_grad():
        clean = model(ids).logits
        with sae.splice(model, error_term=True) as splice:
            same = model(ids).logits
        frequent = int(torch.bincount(splice.latents.cols).argmax())
        with sae.splice(model, error_term=True, ablate=[frequent]):
            ablated = model(ids).logits
        latent = int(sae.logit_effect(model).amax(-1).argmax())
        with sae.splice(model, error_term=True, steer={latent: 10.0}):
            generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    print(json.dumps({"module": type(sae).__module__, "equal": torch.equal(clean, same),
                      "ablation_change": float((ablated - clean).abs().max()), "generated": generated.shape[1]}))
    """
)


def test_splice_from_trust_remote_code_without_the_package(tmp_path: Path):
    tiny_model().save_pretrained(tmp_path / "lm")
    sae = tiny_sae()
    sae.save_pretrained(tmp_path / "sae")
    assert (tmp_path / "sae" / "interventions.py").is_file()  # saved beside the model code
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SPLICE, str(tmp_path / "sae"), str(tmp_path / "lm")],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules") and report["equal"]
    assert report["ablation_change"] > 0 and report["generated"] == 8 + 4
