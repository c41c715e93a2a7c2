"""Naive fine-tuning: the lower bound every forgetting strategy is compared with."""

from clbench.strategy import Strategy, register


@register("naive")
class Naive(Strategy):
    """Fine-tune every parameter on the current task's loss only."""

    shares_first_stage = True
    protects = "none"
    not_combinable = "naive is plain fine-tuning, so naive+X is just X: name X alone"
