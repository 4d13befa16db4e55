"""Reproducing the paper's ResNet-20 CIFAR-10 experiments at a budget: the campaign
(:mod:`.campaign`), its evaluation stages (:mod:`.stages`), the paper's numbers
(:mod:`.paper`) and the report with a verdict per claim (:mod:`.report`)."""

from awn_jax.reproduction.campaign import BUDGETS, STAGES, Budget, run_campaign, train_runs

__all__ = ["BUDGETS", "STAGES", "Budget", "run_campaign", "train_runs"]
