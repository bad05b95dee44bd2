"""The run folder's bookkeeping: its layout, atomic files, the resume rules, timings, training
logs, and what a run trains (the plan's data). Imports only trainer.config and trainer.errors."""
