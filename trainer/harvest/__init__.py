"""The base model and its activations: loading and hooks, text to token contexts, the activation
and attribution caches, and everything a run reads from the base model. Imports run/ and below."""
