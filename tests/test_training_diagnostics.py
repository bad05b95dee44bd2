"""What a run reports so a reader can tell a trained dictionary from a random one: how far training
moved the decoder rows from their initialisation, and the level random directions reach in the
consistency comparison."""

from __future__ import annotations

import torch
from test_modeling import make_model
from test_threshold_calibration import sparse_data

from trainer.config import OptimizerConfig
from trainer.sae.metrics import chance_max_cosine, decoder_consistency
from trainer.sae.training import SAETrainer


def test_decoder_cosine_to_init_falls_with_training_and_survives_a_checkpoint(tmp_path):
    trainer = SAETrainer(make_model(), OptimizerConfig(lr=3e-3, warmup_steps=10), total_steps=100)
    assert trainer.decoder_cosine_to_init() > 0.9999  # nothing trained yet
    for step in range(100):
        trainer.step(sparse_data(256, seed=step))
    trained = trainer.decoder_cosine_to_init()
    assert trained < 0.97, f"100 steps at lr 3e-3 should move the median decoder row; cosine {trained}"
    checkpoint = tmp_path / "checkpoint.pt"
    trainer.save_checkpoint(checkpoint)
    resumed = SAETrainer(make_model(seed=1), OptimizerConfig(lr=3e-3, warmup_steps=10), total_steps=100)
    resumed.load_checkpoint(checkpoint)  # another initialisation: the start must come from the checkpoint
    assert resumed.decoder_cosine_to_init() == trained


def test_core_rows_are_left_out_of_the_drift():
    trainer = SAETrainer(make_model(core_size=12), OptimizerConfig(), total_steps=1)
    assert trainer.drift_rows.min() == 12 and len(trainer.drift_rows) == 160 - 12


def test_unrelated_dictionaries_match_at_the_random_direction_level():
    """Two independently initialised SAEs share nothing: their mean best match is what random
    directions reach against the same decoder; an SAE against itself matches every latent."""
    a, b = make_model(seed=1, num_latents=512, group_sizes=[12, 488]), make_model(seed=2, num_latents=512, group_sizes=[12, 488])
    chance = chance_max_cosine(b)
    unrelated = decoder_consistency(a, b, core_size=0)["rest"]
    assert abs(unrelated["mean_max_cosine"] - chance) < 0.03, (unrelated, chance)
    assert unrelated["matched"] == 0
    itself = decoder_consistency(b, b, core_size=0)["rest"]
    assert itself["matched"] == 512 and itself["mean_max_cosine"] > chance + 0.3
