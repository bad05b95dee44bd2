"""The evidence reader (``modeling_dmsae.LatentEvidence``): it returns what the trainer's writer wrote,
from a folder or a Hub repo, and computes the same evidence on a user's texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import SENTENCES, random_batch, tiny_model, tiny_tokenizer

from modeling_dmsae import DMSAEConfig, DMSAEModel, LatentEvidence
from modeling_dmsae import evidence as ev
from modeling_dmsae.evidence import EvidenceStream, EvidenceTensors
from trainer.pipeline.evaluation import evidence_files

HOOK = "model.layers.1"


def tiny_sae(**overrides) -> DMSAEModel:
    torch.manual_seed(0)
    fields = dict(d_in=32, num_latents=48, group_sizes=[16, 32], k=4, hook_module=HOOK, threshold=0.05, max_norm_ratio=0.0)
    sae = DMSAEModel(DMSAEConfig(**{**fields, **overrides})).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.1)
    return sae


def hooked(model, input_ids: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.get_submodule(HOOK).register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return captured[0]


def write_run_evidence(folder: Path) -> tuple[EvidenceTensors, torch.Tensor]:
    """What the run's evaluation computes and writes beside a final SAE, on tiny held-out contexts."""
    model, sae, tokenizer = tiny_model(), tiny_sae(), tiny_tokenizer()
    input_ids, kept = random_batch(batch=4, length=24)
    activations = hooked(model, input_ids)[kept]
    stream = EvidenceStream(sae.config.num_latents, torch.device("cpu"))
    for first_row in range(0, len(activations), 17):
        stream.add(sae(activations[first_row : first_row + 17], output_dense_latents=False), first_row)
    slots = kept.flatten().nonzero().squeeze(1)
    data = stream.finish(sae, activations, slots, input_ids, ev.top_logit_effects(sae, model))
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in evidence_files(data, tokenizer).items():
        (folder / name).write_text(json.dumps(content)) if isinstance(content, dict) else (folder / name).write_bytes(content)
    return data, input_ids


def test_the_reader_returns_what_the_trainers_writer_wrote(tmp_path: Path):
    data, input_ids = write_run_evidence(tmp_path / "k-0004-dense_core")
    evidence = LatentEvidence.from_folder(tmp_path / "k-0004-dense_core")
    for name, tensor in data.tensors().items():
        torch.testing.assert_close(getattr(evidence.data, name), tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    text = tiny_tokenizer().decode
    fired = (data.firing_frequency > 0).nonzero().squeeze(1).tolist()
    assert len(fired) > 10
    for j in fired:
        top = evidence.top_contexts(j)
        assert [e.activation for e in top] == data.example_activation[j, : len(top)].tolist() and len(top) > 0
        assert all(a >= b for a, b in zip([e.activation for e in top], [e.activation for e in top][1:]))
        for example in [*top, *evidence.typical_contexts(j)]:
            first = max(example.position - ev.WINDOW_BEFORE, 0)
            ids = input_ids[example.context, first : example.position + ev.WINDOW_AFTER + 1].tolist()
            assert example.tokens == [text([i]) for i in ids]
            assert example.token == text([int(input_ids[example.context, example.position])])
            assert example.activations[example.index] == pytest.approx(example.activation, rel=2e-3)
            assert len(example.activations) == len(example.tokens)
        typical = [e.activation for e in evidence.typical_contexts(j)]
        assert typical == sorted(typical)
        assert evidence.stats(j) == (pytest.approx(float(data.firing_frequency[j])), pytest.approx(float(data.mean_activation[j])),
                                     pytest.approx(float(data.max_activation[j])))
        histogram = evidence.histogram(j)
        assert histogram.counts == data.histogram[j].tolist() and len(histogram.edges) == ev.HISTOGRAM_BINS + 1
        effect = evidence.logit_effect(j)
        assert [t.token_id for t in effect.promoted] == data.promoted_tokens[j].tolist()
        assert [t.token for t in effect.suppressed] == [text([i]) for i in data.suppressed_tokens[j].tolist()]
        assert effect.promoted[0].logit == pytest.approx(float(data.promoted_logits[j, 0]))


def test_windows_at_the_start_of_a_context_show_the_bos_the_sae_never_read(tmp_path: Path):
    write_run_evidence(tmp_path)
    evidence = LatentEvidence.from_folder(tmp_path)
    early = [e for j in range(evidence.num_latents) for e in evidence.top_contexts(j) if e.position < ev.WINDOW_BEFORE]
    assert early and all(e.index == e.position for e in early)  # the window starts at the context's first token
    assert all(e.activations[0] != e.activations[0] for e in early)  # position 0 (masked, as BOS is): NaN


def test_from_a_hub_repo(hub, tmp_path: Path):
    data, _ = write_run_evidence(tmp_path / "folder")
    repo = f"{hub.org}/dmsae-tiny-k4"
    hub.server.create_repo_with_files(repo, {p.name: p.read_bytes() for p in (tmp_path / "folder").iterdir()})
    evidence = LatentEvidence.from_folder(repo)
    assert torch.equal(evidence.data.example_activation, data.example_activation)
    assert evidence.top_contexts(int(data.firing_frequency.argmax()))


def test_from_texts_is_the_runs_computation_on_the_texts():
    """Each example is where latents_from_text finds the latent at that value, the top ones are
    its largest values over the texts, and the statistics are those of the positions it read."""
    model, sae, tokenizer = tiny_model(), tiny_sae(), tiny_tokenizer(adds_bos=True)
    texts = [*SENTENCES, "Short."]
    evidence = LatentEvidence.from_texts(sae, model, tokenizer, texts, batch_size=2)
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    out = sae.latents_from_text(model, inputs.input_ids, inputs.attention_mask)
    assert not out.kept[:, 0].any() and not out.kept.all()  # BOS and padding left out
    read = out.latents[out.kept]  # [positions read, K]
    torch.testing.assert_close(evidence.data.firing_frequency, (read > 0).float().mean(0))
    checked = 0
    for j in range(sae.config.num_latents):
        top = evidence.top_contexts(j)
        largest = read[:, j].sort(descending=True).values[: min(ev.TOP_N, int((read[:, j] > 0).sum()))]
        torch.testing.assert_close(torch.tensor([e.activation for e in top]), largest)
        for example in [*top, *evidence.typical_contexts(j)]:
            assert out.kept[example.context, example.position]
            assert float(out.latents[example.context, example.position, j]) == pytest.approx(example.activation, rel=1e-5)
            assert example.token == tokenizer.decode([int(inputs.input_ids[example.context, example.position])])
            checked += 1
    assert checked > 50


def test_bad_input_gets_a_one_line_error_naming_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="holds no latent_evidence.safetensors"):
        LatentEvidence.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        LatentEvidence.from_folder(tmp_path / "missing" / "folder")
    write_run_evidence(tmp_path)
    settings = json.loads((tmp_path / ev.EVIDENCE_JSON).read_text())
    evidence = LatentEvidence.from_folder(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        evidence.top_contexts(evidence.num_latents)
    (tmp_path / ev.EVIDENCE_JSON).write_text(json.dumps({**settings, "format": "dmsae-latent-evidence/0"}))
    with pytest.raises(ValueError, match="upgrade dmsae"):
        LatentEvidence.from_folder(tmp_path)
    model, sae = tiny_model(), tiny_sae()
    with pytest.raises(ValueError, match="wrap a single text in a list"):
        LatentEvidence.from_texts(sae, model, tiny_tokenizer(), "one text")
