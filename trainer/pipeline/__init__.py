"""The run itself: the only room that knows the order of the stages, which process does what,
and when the publisher is told (``context.Publisher``: the Hub code, handed in by distill.py, which
is the only caller of ``run.DistillationRun``)."""
