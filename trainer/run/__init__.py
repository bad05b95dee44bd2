"""The run's records and what it trains, from its configuration alone: the run folder's layout
(``layout``), atomic files (``files``), the resume rules (``resume``), timings and training logs, the
kinds of SAE (``kinds``, the registry), every metric and metrics.json (``metrics_file``), the
stages a run trains (``stages``: final SAEs, batch shape, steps, seeds) and the Hub names
(``hub_names``). Imports only trainer.config and trainer.errors (and the model package)."""
