"""The trainer of Distilled Matryoshka SAEs; its rooms are listed in the README ("Development")."""
