"""The base model and its activations: loading and hooks (``base_model``), text to token contexts
(``text_corpus``), the activation and attribution caches (``cache``), the Hub access a run needs
(``hub_access``), the harvest every stage reads (``harvested.Harvest``), and its training batches read
ahead in a background thread (``prefetch``). Imports run/ and below."""
