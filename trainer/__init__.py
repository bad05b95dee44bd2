"""The trainer of Distilled Matryoshka SAEs; its rooms are listed in docs/development.md ("The layout of trainer/")."""
