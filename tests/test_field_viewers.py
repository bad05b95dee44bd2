"""The pure parts of bench/field_viewers.py (sae-dashboard and Neuronpedia exports): which latents it
shows and what it carries over from the run's configuration. The rendering itself needs sae-dashboard's
own environment (bench/setup_dashboard.sh) and is a benchmark, not a test."""

from bench.field_viewers import choose_latents, viewer_settings
from trainer.config import parse_config


def test_choose_latents_takes_the_first_core_and_non_core_latents():
    assert choose_latents(core_size=5, num_latents=12, core_latents=2, other_latents=3) == [0, 1, 5, 6, 7]
    assert choose_latents(core_size=5, num_latents=12, core_latents=-1, other_latents=0) == [0, 1, 2, 3, 4]
    assert choose_latents(core_size=5, num_latents=12, core_latents=0, other_latents=-1) == list(range(5, 12))
    # No core (a baseline): the first latents; more asked for than there are: all of them, once.
    assert choose_latents(core_size=0, num_latents=12, core_latents=8, other_latents=2) == [0, 1]
    assert choose_latents(core_size=5, num_latents=7, core_latents=10, other_latents=10) == list(range(7))


def test_viewer_settings_carry_the_runs_norm_rule_and_batches():
    config = parse_config(["--harvest.max_norm_ratio", "7.5", "--harvest.batch_size", "8", "--data.context_length", "64"])
    settings = viewer_settings(config, "k-0032-dense_core", "blocks.12.hook_resid_post", 231, 4096, [0, 231], [1])
    assert settings["max_norm_ratio"] == 7.5  # sae-dashboard's ignore_high_activation_norm_multiple
    assert settings["batch_size"] == 8  # its forward passes: the batches the run took its medians over
    assert settings["context_length"] == 64
    assert (settings["sae"], settings["hook_name"], settings["latents"], settings["ignore_token_ids"]) == (
        "k-0032-dense_core", "blocks.12.hook_resid_post", [0, 231], [1]
    )
    assert settings["dataset"].startswith("dmsae's embedded corpus: Python's documentation and standard-library source")
    docs_only = parse_config(["--data.embedded_code", "false"])
    assert viewer_settings(docs_only, "s", "h", 0, 8, [0], [])["dataset"].startswith("dmsae's embedded corpus: Python's documentation,")
    hub_text = parse_config(["--data.dataset", "org/texts"])
    assert viewer_settings(hub_text, "s", "h", 0, 8, [0], [])["dataset"].startswith("org/texts,")
