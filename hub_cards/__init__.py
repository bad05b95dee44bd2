"""The Hub code: a reader of a finished (or partly finished) run folder that writes outward, as
``trainer.report`` does. ``cards`` renders the model cards (templates in ``templates/``);
``publish`` builds the Hub-ready folders and pushes them, and is the run's publisher
(``HubPublisher``), which ``trainer/distill.py`` hands to the pipeline. It imports the trainer's lower
rooms (the run folder's layout, the configuration, the kinds and metrics); nothing in ``trainer/``
but the entry point imports it."""
