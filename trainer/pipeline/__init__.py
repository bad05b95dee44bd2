"""The run itself: the only room that knows the order of the stages, which process does what,
and when the Hub is told. distill.py is its only caller."""
