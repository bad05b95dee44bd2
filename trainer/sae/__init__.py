"""One SAE: a training step and loop (fed a data iterator, its bookkeeping as callbacks), core
selection by attribution, held-out metrics. Knows neither the data's source nor the run folder."""
